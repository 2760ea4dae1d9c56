"""The batch loop: images -> model -> method -> results file."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
import torchvision
from omegaconf import DictConfig, OmegaConf

from . import __version__
from .config import target_spec, validate
from .content import check_resume, content_arrays, has_content
from .data import (
    ImageDataset,
    Record,
    build_records,
    native_sizes,
    shard_of,
    shard_range,
)
from .device_decode import check_decoder, decode_ahead
from .errors import ConfigError, DataError, printable
from .identity import check_existing, check_sibling_shards, fingerprint, listing_digest
from .layouts import layer_reshape
from .locks import run_dir_lock, writer_lock
from .methods import METHODS, Method, build_method, explain_topk, target_fn
from .models import (
    build_model,
    check_input_size,
    compile_model,
    resolve_layers,
    use_channels_last,
)
from .progress import Progress
from .runtime import (
    AUTOCAST,
    Normalize,
    apply_precision,
    auto_workers,
    batch_size_of,
    micro_batch_of,
    resolve_device,
    to_host,
)
from .store import (
    ACTIVATIONS,
    ATTRIBUTION,
    DONE,
    FAILED,
    INPUT_MAP,
    INPUT_SIZE,
    LAYER_MAP,
    BackgroundWriter,
    ResultsWriter,
    create_results,
    kind_of,
    layouts_attr,
    open_results,
    read_column,
    remove_stale_temporaries,
)

log = logging.getLogger(__name__)

NOT_MAPS = ("predictions", "targets", "activations", "images")


@dataclass
class Summary:
    path: Path
    n: int
    done: int
    failed: int
    skipped: int = 0  # already done before this run (resume)
    errors: list[tuple[str, str]] = field(default_factory=list)
    nonfinite: int = 0
    top1: list[tuple[str, str, float]] = field(default_factory=list)  # path, class, prob

    def lines(self) -> list[str]:
        out = [f"{self.done} of {self.n} images done, {self.failed} failed"
               + (f" ({self.skipped} were done before this run)" if self.skipped else "")
               + f" -> {self.path}"]
        out += [f"  failed: {printable(p)}: {printable(e)}" for p, e in self.errors[:5]]
        if self.failed > 5:
            out.append(f"  ... and {self.failed - 5} more (see /images/error)")
        if self.nonfinite:
            out.append(f"  warning: {self.nonfinite} maps contain NaN/inf (/images/nonfinite)")
        out += [f"  {printable(Path(p).name)}: {c} ({prob:.2f})" for p, c, prob in self.top1[:10]]
        return out


def results_name(shard: int, num_shards: int) -> str:
    return "results.h5" if num_shards == 1 else f"results.shard-{shard}-of-{num_shards}.h5"


def explain(method: Method, x: torch.Tensor, target: str | int, labels: torch.Tensor | None,
            k: int, micro_batch: int | None = None) -> dict[str, torch.Tensor]:
    """The method on one batch for a :func:`target_spec` target (top-k adds a class axis),
    in passes of at most ``micro_batch`` images (None: one pass). Images are independent,
    so the passes give the same arrays as one; smaller passes need less memory and, on a
    CPU, run faster (see :func:`micro_batch_of`)."""
    if micro_batch is not None and len(x) > micro_batch:
        parts = [explain(method, x[i:i + micro_batch], target,
                         None if labels is None else labels[i:i + micro_batch], k)
                 for i in range(0, len(x), micro_batch)]
        return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
    if target == "topk":
        return explain_topk(method, x, k)
    return method(x, target_fn(target, labels))


def probe_layout(method: Method, x: torch.Tensor, target: str | int,
                 k: int) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Per-image shape and dtype of every array the method returns, from one tiny batch."""
    out = explain(method, x, "topk" if target == "topk" else "pred", None, k)
    return {k: (tuple(v.shape[1:]), np.dtype(str(v.dtype).removeprefix("torch.")))
            for k, v in out.items()}


def native_layout(
    method: Method, normalize: Normalize, device: torch.device, target: str | int, k: int,
    layout: dict[str, tuple[tuple[int, ...], Any]], method_kind: str, sizes: np.ndarray,
) -> tuple[dict[str, np.ndarray], dict[int, str]]:
    """Each image's map shapes for a native-resolution run, to reserve them at creation.

    The method runs once on one zero image per distinct input size (call inside ``with
    method``); a map whose shape depends on the input (every spatial map: CAMs, input
    maps, attributions, unpooled activations) is stored ragged. An input size the model
    cannot take fails its images, with the model's reason.

    Args:
        sizes: (N, 2) input heights and widths, (0, 0) for images without one.
        layout: Per-image shape and dtype of every array, probed at one size.

    Returns:
        (ragged dataset path -> (N, ndim) shapes, zeros where nothing is reserved; row ->
        reason for the images that get no reservation).
    """
    spatial = (LAYER_MAP, INPUT_MAP, ACTIVATIONS, ATTRIBUTION)
    keys = [key for key, (shape, _) in layout.items()
            if kind_of(key, method_kind) in spatial and len(shape) >= 2]
    shapes = {key: np.zeros((len(sizes), len(layout[key][0])), np.int32) for key in keys}
    failed: dict[int, str] = {}
    distinct = sorted({(int(h), int(w)) for h, w in sizes.tolist() if h > 0 and w > 0})
    log.info("native resolution: %d images of %d distinct sizes; one probe per size "
             "reserves their maps", len(sizes), len(distinct))
    for h, w in distinct:
        rows = np.flatnonzero((sizes[:, 0] == h) & (sizes[:, 1] == w))
        try:
            found = probe_layout(method, normalize(torch.zeros(1, 3, h, w, device=device)),
                                 target, k)
        # e.g. a kernel larger than the input; timm's patch embedding asserts divisibility
        except (RuntimeError, ValueError, AssertionError) as e:
            reason = f"the model cannot take a {h}x{w} input: {str(e).splitlines()[0]}"
            failed.update({int(r): reason[:250] for r in rows})
            continue
        for key in keys:
            shapes[key][rows] = found[key][0]
    return shapes, failed


@dataclass
class Job:
    """Everything the batch loop needs, prepared once."""

    cfg: DictConfig
    path: Path  # the results file (or shard file)
    records: list[Record]  # the file's own rows: /images/path and /images/label
    method: Method
    normalize: Normalize
    device: torch.device
    n_classes: int
    categories: list[str] | None
    channels_last: bool  # inputs go to the model in NHWC
    input_sizes: np.ndarray | None = None  # native resolution: (N, 2), 0 = not reserved
    content: bool = False  # the file stores each row's content hash, size and mtime


def extract(cfg: DictConfig, run_dir: Path) -> Summary:
    """Compute the configured method for every image of the run's results file that is not
    done yet, holding the run directory's lock and the file's writer lock throughout (a
    second writer fails at once)."""
    validate(cfg)
    shard, num_shards = shard_of(cfg.data)
    path = Path(run_dir) / results_name(shard, num_shards)
    # The run directory's lock first (shards of one run share it), then the file's own.
    with (run_dir_lock(run_dir, f"extracting {path.name}", shared=num_shards > 1),
          writer_lock(path, "writing")):
        remove_stale_temporaries(path)
        job = prepare(cfg, path, shard, num_shards)
        writer = ResultsWriter(job.path)
        try:
            before = _run_batches(job, writer)
            return _summarize(writer.file, job.path, before, job.categories)
        finally:
            writer.close()


def prepare(cfg: DictConfig, path: Path, shard: int = 0, num_shards: int = 1) -> Job:
    """Check the config against ``path``, build model, method and data, and create the file
    or reopen it. Call with the file's writer lock held."""
    validate(cfg)
    records = build_records(cfg.data)
    if not records:
        raise DataError("the dataset has no images")
    start, stop = shard_range(len(records), shard, num_shards)
    create = check_existing(path, cfg, records, start, stop)  # refuse before slow work
    if not create:  # a resume: done rows must still describe their files
        again = check_resume(path, cfg.get("resume_changed", "refuse"))
        if again:
            log.warning("%d image(s) changed since their rows were done: computing them again "
                        "(resume_changed=recompute)", again)
    if create and num_shards > 1:
        check_sibling_shards(path, cfg, records, num_shards)
    device = resolve_device(cfg.device)
    if cfg.data.decode == "device":
        check_decoder(device)
    apply_precision(cfg.precision)
    torch.manual_seed(cfg.seed)
    model, info = build_model(cfg.model)
    model.to(device)
    size = cfg.data.image_size
    check_input_size(model, size)
    channels_last = use_channels_last(model, cfg.channels_last,
                                      torch.zeros(1, 3, size, size, device=device),
                                      cfg.precision)
    method_cls = METHODS[cfg.method.name]
    layers = resolve_layers(model, cfg.model.target_layers) if method_cls.uses_layers else {}
    n_classes = _n_classes(model, size, device)
    target = target_spec(cfg.target)
    if target == "topk" and cfg.target.k > n_classes:
        raise ConfigError(f"target.k={cfg.target.k}: the model has {n_classes} classes")
    if cfg.topk > n_classes:
        raise ConfigError(f"topk={cfg.topk}: the model has {n_classes} classes")
    if isinstance(target, int) and not target < n_classes:
        raise ConfigError(f"target={target} is not a class of this model (0..{n_classes - 1})")
    reshape, layer_layouts = layer_reshape(model, layers, (size, size), cfg.model.reshape, device)
    method = build_method(cfg.method, model, layers, reshape=reshape,
                          topk=cfg.topk, autocast_dtype=AUTOCAST[cfg.precision],
                          score=cfg.target.score)
    normalize = Normalize(info.mean, info.std).to(device)
    path.parent.mkdir(parents=True, exist_ok=True)
    if create:
        with method:
            layout = probe_layout(method, normalize(torch.zeros(1, 3, size, size, device=device)),
                                  target, cfg.target.k)
            native: dict[str, Any] = {}
            chunk = records[start:stop]
            if cfg.data.resize is None:
                sizes, failed = native_sizes(chunk, cfg.data.get("max_side"))
                ragged, unfit = native_layout(method, normalize, device, target,
                                              cfg.target.k, layout, method_cls.kind, sizes)
                failed.update(unfit)
                sizes[list(failed)] = 0  # nothing reserved: the row stays failed
                native = {"ragged": ragged, "input_size": sizes, "failed": failed}
        attrs = {
            "method": cfg.method.name, "model": cfg.model.name,
            "target_layers": list(layers), "config": OmegaConf.to_yaml(cfg, resolve=True),
            "fingerprint": fingerprint(cfg), "image_size": size,
            "resize": cfg.data.resize or "none", "shard": shard, "num_shards": num_shards,
            "first_index": start, "n_total": len(records),
            "listing_sha256": listing_digest(records), "categories": info.categories or [],
            "mean": list(info.mean), "std": list(info.std), **layouts_attr(layer_layouts),
            "versions": {"camsweep": __version__, "torch": torch.__version__,
                         "torchvision": torchvision.__version__, "h5py": h5py.__version__},
        }
        create_results(path, [r.path for r in chunk], np.array([r.label for r in chunk]),
                       np.arange(start, stop), layout, attrs, method_kind=method_cls.kind,
                       **native)
    with open_results(path) as f:  # the rows as fixed at creation, not today's listing
        rows = [Record(p, int(lab)) for p, lab in zip(
            read_column(f, "images/path"), read_column(f, "images/label").tolist(), strict=True)]
        input_sizes = read_column(f, INPUT_SIZE) if INPUT_SIZE in f else None
        content = has_content(f)
    if cfg.compile:  # after resolve_layers: the compiled wrapper renames every module
        x = normalize(torch.zeros(min(batch_size_of(cfg.batch_size, device), len(rows)), 3, size,
                                  size, device=device))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        method.model = compile_model(model, x, lambda compiled: _warm_up(method, compiled, x, cfg))
    return Job(cfg, path, rows, method, normalize, device, n_classes, info.categories,
               channels_last, input_sizes, content)


def _warm_up(method: Method, compiled: torch.nn.Module, x: torch.Tensor,
             cfg: DictConfig) -> None:
    """Run the method on ``compiled`` as the batch loop will (its grad mode, autocast, hooks,
    batch size and passes), so the model compiles here and not again at the first batch."""
    method.model = compiled
    labels = torch.zeros(len(x), dtype=torch.long)
    with method:
        explain(method, x, target_spec(cfg.target), labels, cfg.target.k,
                micro_batch_of(cfg.micro_batch, x.device))


def _n_classes(model: torch.nn.Module, size: int, device: torch.device) -> int:
    with torch.inference_mode():
        return int(model(torch.zeros(1, 3, size, size, device=device)).shape[1])


def _run_batches(job: Job, writer: ResultsWriter) -> int:
    """Process the file's rows that are not done (pending, or failed before: a failure may
    not repeat); returns how many were done before."""
    cfg, device = job.cfg, job.device
    target = target_spec(cfg.target)
    micro_batch = micro_batch_of(cfg.micro_batch, device)
    pending = writer.pending_rows()
    before = len(writer.file["images/status"]) - len(pending)
    if job.input_sizes is not None:  # rows with nothing reserved stay failed (their reason)
        pending = pending[job.input_sizes[pending].min(axis=1) > 0]
    dataset = ImageDataset(job.records, pending, cfg.data.image_size, cfg.data.resize,
                           cfg.data.decode, job.input_sizes, cfg.data.get("max_side"))
    batch_size = batch_size_of(cfg.batch_size, device)
    workers = cfg.num_workers if cfg.num_workers is not None else auto_workers(
        len(dataset), batch_size)
    loader = dataset.loader(batch_size, workers, device)
    background = BackgroundWriter(writer)
    failed = 0
    # A bar on a terminal, a line every 30 s in job logs (SLURM .out, run.log).
    bar = Progress(len(dataset), f"{cfg.method.name} {job.path.parent.name}")
    try:
        with job.method:
            # Copy whole (pinned) batches and select on the device: indexing on the host
            # first would make an unpinned copy and a blocking transfer.
            for batch, x in decode_ahead(loader, device, cfg.data.image_size):
                rows = batch["index"]
                errors = _batch_errors(rows, batch, target, job.n_classes)
                ok = torch.tensor([int(r) not in errors for r in rows])
                arrays: dict[str, np.ndarray] = {}
                if ok.any():
                    if not ok.all():
                        x = x[ok.to(device, non_blocking=True)]
                    x = job.normalize(x)
                    if job.channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                    out = explain(job.method, x, target, batch["label"][ok], cfg.target.k,
                                  micro_batch)
                    out["images/nonfinite"] = _nonfinite(out)
                    # No host sync here: copies run behind the next batch; the writer
                    # waits for them (the event) before it writes.
                    arrays, ready = to_host(out)
                    arrays["images/size"] = batch["size"][ok].numpy()
                    arrays["images/box"] = batch["box"][ok].numpy()
                    if job.content:
                        arrays.update(content_arrays(batch["content"][ok.numpy()]))
                else:
                    ready = None
                background.put(rows[ok].numpy(), arrays, errors, ready)
                failed += len(errors)
                bar.update(len(rows), failed=failed)
    finally:
        bar.close()
        background.close()
    return before


def _batch_errors(rows: torch.Tensor, batch: dict[str, Any], target: Any,
                  n_classes: int) -> dict[int, str]:
    """Row -> reason for the images of a batch that cannot be explained."""
    errors = {int(r): e for r, e in zip(rows, batch["error"], strict=True) if e}
    if target == "label":
        for r, lab in zip(rows.tolist(), batch["label"].tolist(), strict=True):
            if r in errors:
                continue
            if lab < 0:
                errors[r] = "target=label but the image has no label"
            elif lab >= n_classes:
                errors[r] = f"label {lab} is not a class of this model (0..{n_classes - 1})"
    return errors


def _nonfinite(out: dict[str, torch.Tensor]) -> torch.Tensor:
    """1 for images whose maps hold NaN/inf (flagged in the file, not a crash)."""
    maps = [v for k, v in out.items() if k.split("/")[0] not in NOT_MAPS
            and not k.split("/")[0].endswith("_weights")]
    n = next(iter(out.values())).shape[0]
    if not maps:
        return torch.zeros(n, dtype=torch.uint8, device=next(iter(out.values())).device)
    finite = torch.stack([v.flatten(1).isfinite().all(1) for v in maps])
    return (~finite.all(0)).to(torch.uint8)


def _summarize(f: h5py.File, path: Path, skipped: int, categories: list[str] | None) -> Summary:
    status = read_column(f, "images/status")
    paths = read_column(f, "images/path")
    errors = read_column(f, "images/error")
    failed_rows = np.flatnonzero(status == FAILED)
    summary = Summary(path=path, n=len(status), done=int((status == DONE).sum()),
                      failed=len(failed_rows), skipped=skipped,
                      errors=[(paths[i], errors[i]) for i in failed_rows[:5]],
                      nonfinite=int(read_column(f, "images/nonfinite")[status == DONE].sum()))
    done_rows = np.flatnonzero(status == DONE)[:10]
    if len(done_rows):
        # The first done rows need not be the first rows (an early image may have failed).
        cls = read_column(f, "predictions/class", done_rows)[:, 0]
        prob = read_column(f, "predictions/prob", done_rows)[:, 0]
        for i, c, p in zip(done_rows, cls, prob, strict=True):
            name = categories[c] if categories and 0 <= c < len(categories) else str(c)
            summary.top1.append((paths[i], f"{c} {name}", float(p)))
    return summary
