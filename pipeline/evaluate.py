"""The evaluate stage: how good are the stored maps? Numbers per image, in their own file.

``python run.py stage=evaluate run_dir=DIR`` re-loads the run's images and model (from the
resolved config stored in ``results.h5``) and scores every stored map (``/gradcam/<layer>``,
``/saliency/input``, ... any CAM or input-gradient method) with the metrics of the registry
(:mod:`pipeline.metrics.registry`; the built-in ones in :mod:`pipeline.metrics.declared`).
``DIR`` may also be a sweep (or any folder of runs): every job is evaluated, those already
evaluated with the same settings are skipped, and one table ends the stage
(:mod:`pipeline.evaluate_sweep`).

What this module does is the stage: the batch loop, the resumable partial file and the
install of ``DIR/metrics.h5`` (layout, writing and reading: :mod:`pipeline.store.metrics`);
the run as it was (stored config, model, rows) comes from :mod:`pipeline.evaluate_setup`.
``results.h5`` is only ever opened read-only, through :func:`pipeline.store.open_results`.
The run's writer lock and that of ``metrics.h5`` are held for the whole stage: no
extraction, merge or second evaluation can run beside it, and a sweep's status can tell an
evaluating job (``metrics.h5`` locked) from an extracting one.
"""

from __future__ import annotations

import logging
import sys
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from . import __version__
from .errors import ConfigError, StoreError, unknown
from .evaluate_setup import Setup, confidence_score, explained_score, metric_score, read_setup
from .locks import run_dir_lock, writer_lock
from .methods.base import target_score
from .metrics.batch import Evaluation, MetricBatch
from .metrics.common import SCORES, Scorer
from .metrics.registry import METRICS, check_options, coordinates, layout
from .store import identity, open_results, read_map_rows, write_error
from .store.atomic import remove_temporaries
from .store.metrics import (
    METRICS_FILE,
    PARTIAL,
    MapSummary,
    Partial,
    existing,
    install,
    summarize_run,
)

log = logging.getLogger(__name__)

__all__ = ["METRICS", "METRICS_FILE", "PARTIAL", "EvaluateSummary", "MapSummary",
           "check_settings", "evaluate"]


# -- settings ----------------------------------------------------------------------------------

def check_settings(ev: Any) -> None:
    """One-line errors for bad ``evaluate.*`` values, before any work: unknown metrics,
    the options each chosen metric declares (:func:`pipeline.metrics.registry.check_options`)
    and the score."""
    check_options(ev)
    if ev.score is not None and ev.score not in SCORES:
        raise ConfigError(unknown("evaluate.score", ev.score, SCORES))


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
    failed: list[str] = field(default_factory=list)  # images that no longer load

    def lines(self) -> list[str]:
        out = [f"evaluated {self.evaluated} images -> {self.path}"
               + (f" ({self.skipped} were done before this run)" if self.skipped else "")]
        if self.failed:
            out.append(f"  not evaluated: {len(self.failed)} images no longer load ("
                       f"{', '.join(self.failed[:3])}{', ...' if len(self.failed) > 3 else ''})"
                       "; restore them and rerun")
        out += [f"  {m.line()}" for m in self.maps]
        out += [f"  note: {n}" for n in self.notes]
        return out


def _settings(cfg: DictConfig, setup: Setup, extra: dict[str, Any]) -> dict[str, Any]:
    """What the numbers mean: the ``evaluate`` options (not overwrite and limit), the maps,
    the scores, and what the metrics' ``prepare`` added (``sanity_units``, ``max_boxes``)."""
    ev = OmegaConf.to_container(cfg.evaluate, resolve=True)
    assert isinstance(ev, dict)
    for key in ("overwrite", "limit"):
        ev.pop(key, None)
    ev["maps"] = setup.maps
    ev["score"] = metric_score(cfg.evaluate, setup.stored)
    ev["confidence_score"] = confidence_score(ev["score"])
    ev.setdefault("sanity_units", [])
    return {**ev, **extra}


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


def evaluate(cfg: DictConfig, run_dir: Path) -> Any:
    """Score the maps of the run in ``run_dir`` and write them to ``run_dir/metrics.h5``;
    a folder of runs (a sweep) evaluates each (:func:`pipeline.evaluate_sweep.evaluate_sweep`).

    Args:
        cfg: The invocation's config: ``evaluate.*``, ``device``, ``batch_size``,
            ``num_workers``, ``channels_last`` (and ``model._target_``, which allows a
            stored one). Model, method, data, target and seed come from the config stored
            in the results file.
        run_dir: The run's folder (holding ``results.h5``), or a sweep folder.

    Returns:
        :class:`EvaluateSummary` (what was evaluated, per-map figures), or for a sweep a
        :class:`pipeline.evaluate_sweep.SweepEvaluation`.

    Raises:
        StoreError: No, a damaged or a busy results file (another process holds its writer
            lock), existing metrics without ``evaluate.overwrite=true``, a full disk.
        ConfigError: Bad ``evaluate.*`` values, or a stored ``model._target_`` that this
            command line does not name.
    """
    check_settings(cfg.evaluate)
    run_dir = Path(run_dir)
    path = run_dir / "results.h5"
    if not path.is_file():  # before the lock, which would create the folder
        from .evaluate_sweep import evaluate_sweep, job_folders

        if run_dir.is_dir() and job_folders(run_dir):
            return evaluate_sweep(cfg, run_dir)
        raise StoreError(f"no results file at {path}")
    target = run_dir / METRICS_FILE
    with ExitStack() as locks:
        locks.enter_context(run_dir_lock(run_dir, "evaluating"))  # one writer per run_dir
        for locked in (path, target):
            try:  # a full disk fails the lock file's write: one line
                locks.enter_context(writer_lock(locked, "evaluating"))
            except OSError as e:
                raise write_error(locked.with_name(f".{locked.name}.lock"), e) from e
        return _evaluate_locked(cfg, run_dir, path, target)


def _evaluate_locked(cfg: DictConfig, run_dir: Path, path: Path,
                     target: Path) -> EvaluateSummary:
    from .runtime import auto_workers, batch_size_of, resolve_device

    ev = cfg.evaluate
    # Temporaries of an evaluation killed while writing one; nobody else writes here now.
    remove_temporaries(target)
    remove_temporaries(run_dir / PARTIAL)
    with open_results(path) as f:
        results = identity(f)
    _confirm_replace(target, results, bool(ev.overwrite))
    device = resolve_device(cfg.device)
    setup = read_setup(cfg, path, device)
    worker = _BatchEvaluator(cfg, setup, device, path)
    settings = _settings(cfg, setup, worker.ctx.settings)
    metrics = worker.metrics
    classes = setup.targets.shape[1] if setup.targets.ndim == 2 else 0
    spec = layout(settings, setup.maps, metrics, classes)
    partial = Partial(run_dir / PARTIAL, setup.n, settings, results, spec, worker.ctx.initial)
    try:
        todo = partial.pending(setup.rows)
        skipped = len(setup.rows) - len(todo)
        workers = cfg.num_workers if cfg.num_workers is not None else auto_workers(
            len(todo), batch_size_of(cfg.batch_size, device))
        worker.run(todo, partial, workers)
        done = partial.done()
    finally:
        partial.close()
    evaluated = int(done[setup.rows].sum())
    attrs = {
        "created": datetime.now(timezone.utc).isoformat(), "settings": settings,
        "metrics": metrics, "maps": setup.maps, "camsweep_version": __version__,
        "n_evaluated": evaluated, "score_check_max_abs_diff": worker.max_score_diff,
        "sanity_layers": settings["sanity_units"],
        "road_removed_percent": [float(q) for q in ev.road_percentiles],
        "steps": int(ev.steps), "score": settings["score"],
    }
    install(partial.path, target, results, attrs, setup.paths,
            coordinates(settings, metrics, classes))
    return EvaluateSummary(path=target, evaluated=evaluated - skipped, skipped=skipped,
                           maps=summarize_run(run_dir), notes=worker.ctx.notes,
                           failed=worker.failed)


class _BatchEvaluator:
    """The batch loop of the evaluate stage: each chosen metric's compute function per
    batch, as the registry declares it."""

    def __init__(self, cfg: DictConfig, setup: Setup, device: torch.device,
                 path: Path) -> None:
        ev = cfg.evaluate
        self.cfg, self.setup, self.device, self.path = cfg, setup, device, path
        scorer = Scorer(setup.model, metric_score(ev, setup.stored), setup.autocast,
                        ev.batch_points)
        size = setup.image_size
        self.ctx = Evaluation(
            ev=ev, model=setup.model, device=device, scorer=scorer,
            confidence=Scorer(setup.model, confidence_score(scorer.kind), setup.autocast,
                              ev.batch_points),
            example=setup.normalize(torch.zeros(1, 3, size, size, device=device)),
            paths=setup.paths, rows=setup.rows, seen=setup.seen, stored=setup.stored,
            build_method=self._method)
        self.explained = explained_score(setup.stored)  # what /targets/score holds
        self.metrics: list[str] = []
        for name in (m for m in METRICS if m in ev.metrics):
            spec = METRICS[name]
            why = spec.function("prepare")(self.ctx) if spec.prepare else None
            if why:
                self.ctx.notes.append(why)
            else:
                self.metrics.append(name)
        self.compute = [METRICS[m].function() for m in self.metrics]
        self.max_score_diff = 0.0
        # The largest |diff| / tolerance seen; above 1 the stored scores are not reproduced.
        self.score_excess = 0.0
        self.score_tolerance = SCORE_TOLERANCE.get(str(setup.stored.get("precision", "fp32")),
                                                   SCORE_TOLERANCE["fp32"])
        self.failed: list[str] = []  # images that no longer load

    def _method(self) -> Any:
        """The stored method on the re-loaded model (the sanity check recomputes maps)."""
        from .layouts import layer_reshape
        from .methods import build_method
        from .runtime import AUTOCAST

        s = self.setup
        reshape, _ = layer_reshape(s.model, s.layers, (s.image_size, s.image_size),
                                   s.stored.model.get("reshape"), self.device)
        try:
            return build_method(s.stored.method, s.model, s.layers, reshape=reshape,
                                topk=int(s.stored.get("topk", 5)),
                                autocast_dtype=AUTOCAST.get(s.stored.get("precision", "fp32")),
                                score=self.explained)
        except (TypeError, ValueError) as e:  # options of a damaged or forged config
            raise StoreError(f"{self.path}: its stored method config does not build "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:160]})") from e

    def run(self, rows: np.ndarray, partial: Partial, workers: int) -> None:
        from .data import ImageDataset, Record
        from .device_decode import decode_ahead
        from .progress import Progress
        from .runtime import batch_size_of

        s, notes = self.setup, self.ctx.notes
        records = [Record(p, int(lab)) for p, lab in zip(s.paths, s.labels, strict=True)]
        native = s.resize == "none"  # the model input at each image's own size, as extracted
        # An image whose bytes changed since extraction fails its row: its maps are not of it.
        dataset = ImageDataset(records, rows, s.image_size, None if native else s.resize,
                               s.decode, s.input_sizes, s.stored.data.get("max_side"),
                               expected=s.content)
        loader = dataset.loader(batch_size_of(self.cfg.batch_size, self.device), workers,
                                self.device)
        changed: list[str] = []
        with open_results(self.path) as f, \
                Progress(len(rows), f"evaluate {self.path.parent.name}") as progress:
            for batch, x in decode_ahead(loader, self.device, s.image_size):
                batch_rows = batch["index"].numpy()
                ok = np.array([not e for e in batch["error"]])
                for r, e in zip(batch_rows[~ok], np.array(batch["error"])[~ok], strict=True):
                    self.failed.append(s.paths[r])
                    notes.append(f"{s.paths[r]} no longer loads ({e}); not evaluated")
                moved = ~np.isclose(batch["box"].numpy(), s.seen[batch_rows], atol=1e-3).all(1)
                changed += [s.paths[r] for r in batch_rows[moved & ok]]
                if ok.any():
                    keep = torch.from_numpy(ok)
                    partial.write(batch_rows[ok], self.batch(f, batch_rows[ok],
                                                             x[keep.to(self.device)]))
                progress.update(len(batch_rows))
        if changed:
            notes.append(f"{len(changed)} images changed size since extraction (e.g. "
                         f"{changed[0]}); their metrics may not match the stored maps")
        if self.score_excess > 1:
            absolute, relative = self.score_tolerance
            notes.append(
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
        s, dev = self.setup, self.device
        n = len(rows)
        classes = s.targets.shape[1] if s.targets.ndim == 2 else 0
        reps = max(1, classes)
        x = s.normalize(pixels)
        logits = self.ctx.scorer.logits(x).repeat_interleave(reps, 0)
        x = x.repeat_interleave(reps, 0) if classes else x
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
        maps = {}
        for key in s.maps:
            # A ragged map gives one array per row; rows of one batch share one input size,
            # so their maps share one shape.
            raw = torch.from_numpy(np.stack(read_map_rows(f, key, self.path, rows))).to(dev)
            maps[key] = raw.reshape(-1, *raw.shape[-2:])
        b = MetricBatch(self.ctx, x, target, logits, rows, reps, maps)
        out: dict[str, torch.Tensor] = {"score": b.original}
        for compute in self.compute:
            out.update(compute(self.ctx, b))
        shape = (n, classes) if classes else (n,)
        return {k: v.detach().float().reshape(*shape, *v.shape[1:]).cpu().numpy()
                for k, v in out.items()}
