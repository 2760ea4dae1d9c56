"""The evaluate stage: how good are the stored maps? Numbers per image, in their own file.

``python run.py stage=evaluate run_dir=DIR`` re-loads the run's images and model (from the
resolved config stored in ``results.h5``) and scores every stored map (``/gradcam/<layer>``,
``/saliency/input``, ... any CAM or input-gradient method) with the metric families of
:mod:`pipeline.metrics`: deletion / insertion, Average Drop / Increase in Confidence, ROAD,
the pointing game and the cascading-randomization sanity check. Everything runs batched on
the run's device; the only Python loops are over batches, chunks, percentiles,
randomization steps and (for per-image reproducible noise) images.

What this module does is the stage: setup (the run as it was), the batch loop, the
resumable partial file and the install of ``DIR/metrics.h5`` (layout and reading:
:mod:`pipeline.metrics.file`). ``results.h5`` is only ever opened read-only, through
:func:`pipeline.store.open_results`, and the run's writer lock is held for the whole stage:
no extraction, merge or second evaluation of the run can run beside it.

Files are data, never code: a ``model._target_`` stored in the results file is imported
and called only when this invocation's own config names the same ``model._target_``.

(About 520 lines: setup, batch loop and install are one sequence under one lock; the metric
math lives in :mod:`pipeline.metrics`.)
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from . import __version__
from .errors import ConfigError, StoreError, unknown
from .locks import writer_lock
from .methods.base import target_score
from .metrics import METRICS
from .metrics.common import SCORES, Scorer, normalize_maps, upsample
from .metrics.confidence import explanation_confidence
from .metrics.file import (
    METRICS_FILE,
    PARTIAL,
    MapSummary,
    Partial,
    existing,
    install,
    layout,
    summarize_run,
)
from .metrics.perturbation import BASELINES, curve_auc, make_baseline, perturbation_curves
from .metrics.pointing import find_boxes, pad_boxes, pointing_game
from .metrics.road import RULES as ROAD_RULES
from .metrics.road import road_scores
from .metrics.sanity import CascadingRandomization, randomization_units, spearman
from .store import (
    DONE,
    INPUT_MAP,
    INPUT_SIZE,
    LAYER_MAP,
    identity,
    open_results,
    read_map_rows,
    read_rows,
    stored_config,
    stored_maps,
)

log = logging.getLogger(__name__)

__all__ = ["METRICS", "METRICS_FILE", "PARTIAL", "EvaluateSummary", "MapSummary",
           "check_settings", "evaluate"]


# -- settings ----------------------------------------------------------------------------------

def check_settings(ev: Any) -> None:
    """One-line errors for bad ``evaluate.*`` values, before any work."""
    for name in ev.metrics:
        if name not in METRICS:
            raise ConfigError(unknown("evaluate metric", name, METRICS))
    for key in ("deletion_baseline", "insertion_baseline"):
        if ev[key] not in BASELINES:
            raise ConfigError(unknown(f"evaluate.{key}", ev[key], BASELINES))
    if ev.score is not None and ev.score not in SCORES:
        raise ConfigError(unknown("evaluate.score", ev.score, SCORES))
    if ev.steps < 1:
        raise ConfigError(f"evaluate.steps must be >= 1, got {ev.steps}")
    if ev.batch_points < 1:
        raise ConfigError(f"evaluate.batch_points must be >= 1, got {ev.batch_points}")
    if ev.blur_sigma <= 0 or ev.blur_size < 1 or ev.blur_size % 2 == 0:
        raise ConfigError(f"evaluate.blur_sigma must be > 0 and evaluate.blur_size odd, got "
                          f"{ev.blur_sigma}, {ev.blur_size}")
    bad = [q for q in ev.road_percentiles if not 0 < float(q) < 100]
    if bad or not len(ev.road_percentiles):
        raise ConfigError(f"evaluate.road_percentiles must be percentages in (0, 100), got "
                          f"{list(ev.road_percentiles)}")
    if ev.road_rule not in ROAD_RULES:
        raise ConfigError(unknown("evaluate.road_rule", ev.road_rule, ROAD_RULES))
    if ev.tolerance < 0 or ev.road_noise < 0:
        raise ConfigError("evaluate.tolerance and evaluate.road_noise must be >= 0")
    if ev.sanity_depth < 1:
        raise ConfigError(f"evaluate.sanity_depth must be >= 1, got {ev.sanity_depth}")


# -- the stage ---------------------------------------------------------------------------------

# How far a re-scored target logit may lie from the stored one before evaluate says that
# images or model changed, per precision of the stored run: (absolute, relative to the
# image's largest |logit|). Under fp32 only the order of float sums differs (batch
# composition, kernels): ~1e-5. TF32 and fp16 keep 10 mantissa bits, bf16 7: their logits
# come in steps of 2^-10 and 2^-7 relative (bf16 logits of 4-8 step by 0.03), and every
# layer before rounds as coarsely, so a few steps are allowed. Changed weights move
# logits by far more (the tests check that the note still comes).
SCORE_TOLERANCE = {"fp32": (1e-3, 1e-4), "tf32": (1e-2, 2.0**-8),
                   "fp16": (1e-2, 2.0**-8), "bf16": (1e-2, 2.0**-5)}


@dataclass
class EvaluateSummary:
    path: Path  # the metrics file
    evaluated: int
    skipped: int
    maps: list[MapSummary]
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"evaluated {self.evaluated} images -> {self.path}"
               + (f" ({self.skipped} were done before this run)" if self.skipped else "")]
        out += [f"  {m.line()}" for m in self.maps]
        out += [f"  note: {n}" for n in self.notes]
        return out


@dataclass
class _Setup:
    """The run as it was: its config, model, normalization, data and what to evaluate."""

    stored: DictConfig
    model: nn.Module
    layers: dict[str, nn.Module]
    normalize: nn.Module
    image_size: int
    resize: str
    decode: str
    paths: list[str]
    labels: np.ndarray
    rows: np.ndarray  # rows to evaluate (done rows, after evaluate.limit)
    maps: list[str]
    targets: np.ndarray  # (N,), or (N, k) for target=topk
    scores: np.ndarray
    sizes: np.ndarray
    seen: np.ndarray
    n: int
    autocast: torch.dtype | None
    boxes: list[list[Any]] | None
    results: dict[str, str]  # identity of the results file (store.identity)
    input_sizes: np.ndarray | None = None  # native resolution (resize "none"): (N, 2)


def _literal(value: Any) -> Any:
    """A stored config as plain data: ``${...}`` would be an OmegaConf interpolation that
    runs a resolver when read, so it is escaped (the stored config was resolved when
    written and holds none)."""
    if isinstance(value, dict):
        return {k: _literal(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_literal(v) for v in value]
    if isinstance(value, str):
        return value.replace("${", "\\${")
    return value


def _stored_config(f: Any, path: Path) -> DictConfig:
    data = stored_config(f, path)
    if not all(isinstance(data.get(k), dict) for k in ("model", "method", "data")):
        raise StoreError(f"{path} is damaged: its stored config lacks model/method/data")
    return OmegaConf.create(_literal(data))


def _model_config(stored: DictConfig, cfg: DictConfig, path: Path) -> DictConfig:
    """The stored model config, once it is known to name only code the user allowed.

    A stored ``model._target_`` (any importable callable) is honoured only when this
    invocation's ``model._target_`` is the same; shipped model names are checked by
    :func:`pipeline.models.build_model`.
    """
    from .config import ModelConfig

    target = stored.model.get("_target_")
    if target is not None:
        given = cfg.model.get("_target_") if "model" in cfg else None
        if given != target:
            raise ConfigError(
                f"{path} asks to import and call model._target_={target!r}; a results file "
                f"does not choose code to run: pass model._target_={target} on the evaluate "
                "command line to allow it")
    try:
        return OmegaConf.merge(OmegaConf.structured(ModelConfig), stored.model)
    except OmegaConfBaseException as e:
        raise StoreError(f"{path}: its stored model config does not fit ("
                         f"{str(e).splitlines()[0]})") from e


def _attr(f: Any, name: str, path: Path) -> Any:
    if name not in f.attrs:
        raise StoreError(f"{path} is damaged: root attribute {name!r} is missing")
    return f.attrs[name]


def _setup(cfg: DictConfig, path: Path, device: torch.device, notes: list[str]) -> _Setup:
    """Read what evaluation needs from the results file (read-only, checked), then rebuild
    the model and find the boxes."""
    from .methods import METHODS
    from .models import build_model, resolve_layers, use_channels_last
    from .runtime import AUTOCAST, Normalize
    from .store import attr_list

    with open_results(path) as f:
        stored = _stored_config(f, path)
        model_cfg = _model_config(stored, cfg, path)  # before anything is imported
        maps = [m.key for m in stored_maps(f, kinds=(LAYER_MAP, INPUT_MAP))]
        if not maps:
            raise StoreError(f"{path} holds no attribution maps to evaluate (method="
                             f"{f.attrs.get('method')}); evaluate needs a CAM or saliency run")
        wanted = list(cfg.evaluate.maps) if cfg.evaluate.maps else maps
        for key in wanted:
            if key not in maps:
                raise ConfigError(unknown("evaluate.maps entry", key, maps))
        status = f["images/status"][:]
        rows = np.flatnonzero(status == DONE)
        if cfg.evaluate.limit is not None:
            rows = rows[: max(0, int(cfg.evaluate.limit))]
        try:
            mean, std = attr_list(_attr(f, "mean", path)), attr_list(_attr(f, "std", path))
            image_size = int(_attr(f, "image_size", path))
        except (TypeError, ValueError) as e:
            raise StoreError(f"{path} is damaged: mean/std/image_size do not parse") from e
        setup_kw = dict(
            paths=list(f["images/path"].asstr()[:]), labels=f["images/label"][:],
            targets=f["targets/class"][:], scores=f["targets/score"][:],
            sizes=f["images/size"][:], seen=read_rows(f, "images/box", path), n=len(status),
            image_size=image_size, resize=str(f.attrs.get("resize", "square")),
            results=identity(f), input_sizes=f[INPUT_SIZE][:] if INPUT_SIZE in f else None)
    if setup_kw["resize"] == "none" and setup_kw["input_sizes"] is None:
        raise StoreError(f"{path} is damaged: a native-resolution run without /{INPUT_SIZE}")
    method_name = stored.method.get("name")
    if method_name not in METHODS:
        raise StoreError(f"{path}: {unknown('stored method', method_name, METHODS)}")
    torch.manual_seed(int(stored.get("seed", 0)))  # random-init models: the same weights
    model, _ = build_model(model_cfg)
    model.to(device)
    size = setup_kw["image_size"]
    # Speed only (the numbers agree up to float rounding): NHWC where channels_last says.
    use_channels_last(model, cfg.channels_last, torch.zeros(1, 3, size, size, device=device))
    layers = (resolve_layers(model, list(stored.model.target_layers))
              if METHODS[method_name].uses_layers else {})
    boxes: list[list[Any]] | None = None
    if "pointing" in cfg.evaluate.metrics:
        boxes, source = find_boxes(cfg.evaluate.boxes, stored.data, setup_kw["paths"])
        if boxes is None:
            notes.append(f"pointing game skipped: {source}")
        else:
            have = sum(1 for r in rows if boxes[r])
            notes.append(f"boxes from {source}: {have} of {len(rows)} images have boxes")
    return _Setup(
        stored=stored, model=model, layers=layers,
        normalize=Normalize(tuple(mean), tuple(std)).to(device),
        decode=str(stored.data.get("decode", "cpu")), rows=rows, maps=wanted,
        autocast=AUTOCAST.get(stored.get("precision", "fp32")), boxes=boxes, **setup_kw)


def _settings(cfg: DictConfig, setup: _Setup, sanity_layers: list[str]) -> dict[str, Any]:
    ev = OmegaConf.to_container(cfg.evaluate, resolve=True)
    assert isinstance(ev, dict)
    for key in ("overwrite", "limit"):  # not part of what the numbers mean
        ev.pop(key, None)
    ev["maps"] = setup.maps
    ev["score"] = metric_score(cfg.evaluate, setup.stored)
    ev["confidence_score"] = confidence_score(ev["score"])
    ev["sanity_units"] = sanity_layers
    return ev


def explained_score(stored: DictConfig) -> str:
    """The run's ``target.score``: what its maps explain and ``/targets/score`` holds (runs
    from before the key existed explained the logit)."""
    target = stored.get("target")
    return str(target.get("score", "logit")) if isinstance(target, DictConfig) else "logit"


def metric_score(ev: Any, stored: DictConfig) -> str:
    """The score the metrics take: ``evaluate.score``, or (null) the run's own."""
    return str(ev.score) if ev.score is not None else explained_score(stored)


def confidence_score(score: str) -> str:
    """The score of Average Drop / Increase in Confidence: a confidence in [0, 1] as in
    Grad-CAM++ (softmax probability; sigmoid where the metrics score sigmoid). A drop
    relative to a logit or a log-probability, which may be negative or zero, means nothing."""
    return score if score in ("prob", "sigmoid") else "prob"


def _confirm_replace(path: Path, results: dict[str, str], overwrite: bool) -> None:
    """Refuse to replace an existing metrics file unless told to (or the user says yes).
    Metrics of an earlier results file (re-extracted since) describe nothing: replaced."""
    found = existing(path, results)
    if found is None:
        return
    state, old = found
    if state == "stale":
        log.warning("evaluate: replacing %s, computed from an earlier results.h5", path)
        return
    what = f"{path} already holds metrics (from {old})" if state == "current" else (
        f"{path} exists but is not a camsweep metrics file")
    if overwrite:
        log.warning("evaluate.overwrite=true: replacing %s", path)
        return
    if sys.stdin is not None and sys.stdin.isatty():
        if input(f"{what}. Replace it? [y/N] ").strip().lower() in ("y", "yes"):
            return
        raise StoreError(f"kept {path}")
    raise StoreError(f"{what}; pass evaluate.overwrite=true to replace them")


def evaluate(cfg: DictConfig, run_dir: Path) -> EvaluateSummary:
    """Score the maps of the run in ``run_dir`` and write them to ``run_dir/metrics.h5``.

    Args:
        cfg: The invocation's config: ``evaluate.*``, ``device``, ``batch_size``,
            ``num_workers``, ``channels_last`` (and ``model._target_``, which allows a
            stored one). Model, method, data, target and seed come from the config stored
            in the results file.
        run_dir: The run's folder (holding ``results.h5``).

    Returns:
        What was evaluated, with per-map means (also logged by the CLI).

    Raises:
        StoreError: No, a damaged or a busy results file (another process holds its writer
            lock), or existing metrics without ``evaluate.overwrite=true``.
        ConfigError: Bad ``evaluate.*`` values, or a stored ``model._target_`` that this
            command line does not name.
    """
    from .runtime import auto_workers, batch_size_of, resolve_device

    ev = cfg.evaluate
    check_settings(ev)
    run_dir = Path(run_dir)
    path = run_dir / "results.h5"
    if not path.is_file():  # before the lock, which would create the folder
        raise StoreError(f"no results file at {path}")
    target = run_dir / METRICS_FILE
    with writer_lock(path, "evaluating"):
        # Temporaries of an evaluation killed while writing one; nobody else writes here now.
        for tmp in (*run_dir.glob(f".{METRICS_FILE}.tmp-*"), *run_dir.glob(f"{PARTIAL}.tmp-*")):
            tmp.unlink(missing_ok=True)
        with open_results(path) as f:
            results = identity(f)
        _confirm_replace(target, results, bool(ev.overwrite))
        device = resolve_device(cfg.device)
        notes: list[str] = []
        setup = _setup(cfg, path, device, notes)
        metrics = [m for m in METRICS if m in ev.metrics and (m != "pointing" or setup.boxes)]
        size = setup.image_size
        example = setup.normalize(torch.zeros(1, 3, size, size, device=device))
        units: dict[str, nn.Module] = {}
        if "sanity" in metrics:
            units = randomization_units(setup.model, example, ev.sanity_layers, ev.sanity_depth)
            if ev.sanity_max_steps is not None:
                units = dict(list(units.items())[: max(0, int(ev.sanity_max_steps))])
            if not units:
                notes.append("sanity check skipped: no layer with parameters to randomize")
                metrics.remove("sanity")
        settings = _settings(cfg, setup, list(units))
        classes = setup.targets.shape[1] if setup.targets.ndim == 2 else 0
        spec = layout(settings, setup.maps, metrics, len(units), classes)
        partial = Partial(run_dir / PARTIAL, setup.n, settings, results, spec)
        try:
            todo = partial.pending(setup.rows)
            skipped = len(setup.rows) - len(todo)
            worker = _BatchEvaluator(cfg, setup, metrics, units, device, path)
            workers = cfg.num_workers if cfg.num_workers is not None else auto_workers(
                len(todo), batch_size_of(cfg.batch_size, device))
            worker.run(todo, partial, workers)
            notes += worker.notes
        finally:
            partial.close()
        attrs = {
            "created": datetime.now(timezone.utc).isoformat(), "settings": settings,
            "metrics": metrics, "maps": setup.maps, "camsweep_version": __version__,
            "n_evaluated": int(len(setup.rows)),
            "score_check_max_abs_diff": worker.max_score_diff,
            "sanity_layers": list(units),
            "road_removed_percent": [float(q) for q in ev.road_percentiles],
            "steps": int(ev.steps), "score": settings["score"],
        }
        install(partial.path, target, results, attrs)
    return EvaluateSummary(path=target, evaluated=len(setup.rows) - skipped, skipped=skipped,
                           maps=summarize_run(run_dir), notes=notes)


class _BatchEvaluator:
    """The batch loop of the evaluate stage."""

    def __init__(self, cfg: DictConfig, setup: _Setup, metrics: list[str],
                 units: dict[str, nn.Module], device: torch.device, path: Path) -> None:
        ev = cfg.evaluate
        self.cfg, self.ev, self.setup, self.metrics = cfg, ev, setup, metrics
        self.device, self.path = device, path
        self.scorer = Scorer(setup.model, metric_score(ev, setup.stored), setup.autocast,
                             ev.batch_points)
        self.confidence = Scorer(setup.model, confidence_score(self.scorer.kind),
                                 setup.autocast, ev.batch_points)
        self.explained = explained_score(setup.stored)  # what /targets/score holds
        self.removed = [float(q) for q in ev.road_percentiles]
        self.units = units
        self.randomizer = CascadingRandomization(units, int(ev.seed)) if units else None
        self.method = self._method() if self.randomizer is not None else None
        self.max_score_diff = 0.0
        # The largest |diff| / tolerance seen; above 1 the stored scores are not reproduced.
        self.score_excess = 0.0
        self.score_tolerance = SCORE_TOLERANCE.get(str(setup.stored.get("precision", "fp32")),
                                               SCORE_TOLERANCE["fp32"])
        self.notes: list[str] = []

    def _method(self) -> Any:
        """The stored method on the re-loaded model (the sanity check recomputes maps)."""
        from .layouts import layer_reshape
        from .methods import build_method
        from .runtime import AUTOCAST

        stored, s = self.setup.stored, self.setup
        reshape, _ = layer_reshape(s.model, s.layers, (s.image_size, s.image_size),
                                   stored.model.get("reshape"), self.device)
        try:
            return build_method(stored.method, self.setup.model, self.setup.layers,
                                reshape=reshape,
                                topk=int(stored.get("topk", 5)),
                                autocast_dtype=AUTOCAST.get(stored.get("precision", "fp32")),
                                score=self.explained)
        except (TypeError, ValueError) as e:  # options of a damaged or forged config
            raise StoreError(f"{self.path}: its stored method config does not build "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:160]})") from e

    def run(self, rows: np.ndarray, partial: Partial, workers: int) -> None:
        from tqdm import tqdm

        from .data import ImageDataset, Record
        from .device_decode import decode_ahead
        from .runtime import batch_size_of

        s = self.setup
        records = [Record(p, int(lab)) for p, lab in zip(s.paths, s.labels, strict=True)]
        native = s.resize == "none"  # the model input at each image's own size, as extracted
        dataset = ImageDataset(records, rows, s.image_size, None if native else s.resize,
                               s.decode, s.input_sizes, s.stored.data.get("max_side"))
        loader = dataset.loader(batch_size_of(self.cfg.batch_size, self.device), workers,
                                self.device)
        changed: list[str] = []
        bar = tqdm(total=len(rows), desc=f"evaluate {self.path.parent.name}", unit="img",
                   dynamic_ncols=True, disable=None)
        try:
            with open_results(self.path) as f:
                for batch, x in decode_ahead(loader, self.device, s.image_size):
                    batch_rows = batch["index"].numpy()
                    ok = np.array([not e for e in batch["error"]])
                    for r, e in zip(batch_rows[~ok], np.array(batch["error"])[~ok], strict=True):
                        self.notes.append(f"{s.paths[r]} no longer loads ({e}); not evaluated")
                    moved = ~np.isclose(batch["box"].numpy(), s.seen[batch_rows], atol=1e-3).all(1)
                    changed += [s.paths[r] for r in batch_rows[moved & ok]]
                    if ok.any():
                        keep = torch.from_numpy(ok)
                        arrays = self.batch(f, batch_rows[ok], x[keep.to(self.device)])
                        partial.write(batch_rows[ok], arrays)
                    bar.update(len(batch_rows))
        finally:
            bar.close()
        if changed:
            self.notes.append(f"{len(changed)} images changed size since extraction (e.g. "
                              f"{changed[0]}); their metrics may not match the stored maps")
        if self.score_excess > 1:
            absolute, relative = self.score_tolerance
            self.notes.append(
                f"re-loaded images and model do not reproduce the stored target scores (max "
                f"|diff| {self.max_score_diff:.3g}, allowed {absolute:g} + {relative:.3g} x "
                f"the image's largest |logit| at precision "
                f"{self.setup.stored.get('precision', 'fp32')}): weights, images or "
                "preprocessing changed since extraction; the metrics describe today's model, "
                "not the stored maps'")

    def batch(self, f: Any, rows: np.ndarray, pixels: torch.Tensor) -> dict[str, np.ndarray]:
        """All metrics of one batch, as host arrays keyed by their path in the metrics file.

        A target=topk run explains k classes per image: every (image, class) pair is scored
        as an item of its own (the image repeated, as at extraction), and the results get
        the class axis back.
        """
        s, ev, dev = self.setup, self.ev, self.device
        n = len(rows)
        classes = s.targets.shape[1] if s.targets.ndim == 2 else 0
        reps = max(1, classes)
        x = s.normalize(pixels)
        size = tuple(x.shape[-2:])
        logits = self.scorer.logits(x).repeat_interleave(reps, 0)
        x = x.repeat_interleave(reps, 0) if classes else x
        item_rows = np.repeat(rows, reps)
        target = torch.from_numpy(s.targets[rows].reshape(-1).astype(np.int64)).to(dev)
        stored = torch.from_numpy(s.scores[rows].reshape(-1)).to(dev)
        # The explained score, as stored. A change of the logits by at most d changes
        # softmax_t by <= d/2, sigmoid by <= d/4, log_softmax_t (z_t - logsumexp z) by <= 2d:
        # the logits' tolerance, doubled for logprob, covers them all.
        diffs = (target_score(logits, target, self.explained) - stored).abs()
        absolute, relative = self.score_tolerance
        allowed = (absolute + relative * logits.detach().abs().amax(1)) * (
            2.0 if self.explained == "logprob" else 1.0)
        self.max_score_diff = max(self.max_score_diff, float(diffs.max()))
        self.score_excess = max(self.score_excess, float((diffs / allowed).max()))
        original = self.scorer.from_logits(logits, target)
        out: dict[str, torch.Tensor] = {"score": original}
        maps_in = {}
        for key in s.maps:
            # A ragged map gives one array per row; rows of one batch share one input size,
            # so their maps share one shape.
            raw = torch.from_numpy(np.stack(read_map_rows(f, key, self.path, rows))).to(dev)
            maps_in[key] = raw.reshape(-1, *raw.shape[-2:])
        baselines: dict[str, torch.Tensor] = {}
        for key, raw in maps_in.items():
            saliency = upsample(raw, size)
            normalized = upsample(normalize_maps(raw), size)
            for mode in ("deletion", "insertion"):
                if mode not in self.metrics:
                    continue
                kind = ev[f"{mode}_baseline"]
                if kind not in baselines:
                    baselines[kind] = make_baseline(x, kind, ev.blur_sigma, ev.blur_size)
                curves = perturbation_curves(self.scorer, x, saliency, target, baselines[kind],
                                             int(ev.steps), mode, original)
                out[f"{key}/{mode}"] = curves
                out[f"{key}/{mode}_auc"] = curve_auc(curves)
            if "confidence" in self.metrics:
                confident = self.confidence.from_logits(logits, target)
                for name, value in explanation_confidence(self.confidence, x, raw, target,
                                                          confident).items():
                    out[f"{key}/{name}"] = value
            if "road" in self.metrics:
                # Per item seeds: the noise of an image does not depend on its batch.
                seeds = (torch.from_numpy(item_rows.astype(np.int64)) * reps
                         + torch.arange(reps).repeat(n) + int(ev.seed) * 1_000_003)
                morf, lerf = road_scores(self.scorer, x, normalized, target, self.removed,
                                         float(ev.road_noise), seeds, str(ev.road_rule))
                out[f"{key}/road_morf"], out[f"{key}/road_lerf"] = morf, lerf
                out[f"{key}/road"] = ((lerf - morf) / 2).mean(1)
            if "pointing" in self.metrics and s.boxes is not None:
                boxes = pad_boxes([s.boxes[r] for r in item_rows]).to(dev)
                seen = torch.from_numpy(s.seen[item_rows]).to(dev)
                hit, energy = pointing_game(normalized, seen, boxes, float(ev.tolerance))
                out[f"{key}/pointing_hit"], out[f"{key}/pointing_energy"] = hit, energy
        if "sanity" in self.metrics and self.randomizer is not None:
            out.update(self._sanity(x, target, maps_in))
        shape = (n, classes) if classes else (n,)
        return {k: v.detach().float().reshape(*shape, *v.shape[1:]).cpu().numpy()
                for k, v in out.items()}

    def _sanity(self, x: torch.Tensor, target: torch.Tensor,
                stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        assert self.randomizer is not None and self.method is not None
        rho = {key: torch.empty(len(x), len(self.units), device=x.device) for key in stored}
        method = self.method
        try:
            with method:
                for j, name in enumerate(self.units):
                    self.randomizer.randomize(name)  # cascading: earlier units stay random
                    maps = method(x, lambda _logits: target)
                    for key, original in stored.items():
                        rho[key][:, j] = spearman(original, maps[key])
        finally:
            self.randomizer.restore()
        return {f"{key}/sanity_spearman": value for key, value in rho.items()}
