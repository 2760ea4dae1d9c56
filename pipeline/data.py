"""Image lists (bundled samples, a glob, ImageNet val) and a dataset that never raises.

Decoding happens in DataLoader workers; each item is uint8 pixels at the model's input
size, so workers do the cheap part and the device does the float math. An image that does
not decode becomes an item with an error string; the run records it and goes on.

At native resolution (``data.resize=null``) each image keeps its own size (capped by
``data.max_side``); :class:`SizeBatches` then batches images of equal size together.
"""

from __future__ import annotations

import csv
import glob as globlib
import logging
import math
import os
import stat
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from .device_decode import route
from .errors import ConfigError, DataError
from .images import (
    CONTENT_HASH,
    CROP_RATIO,
    FileFacts,
    capped,
    check_regular,
    content_hash,
    header_size,
    input_box,
    read_image,
)

log = logging.getLogger(__name__)
SAMPLES_DIR = Path(__file__).parent / "samples"


@dataclass(frozen=True)
class Record:
    path: str
    label: int = -1


def _read_samples() -> list[Record]:
    with open(SAMPLES_DIR / "labels.csv", newline="") as f:
        return [Record(str(SAMPLES_DIR / r["file"]), int(r["label"])) for r in csv.DictReader(f)]


def _read_glob(pattern: str | None) -> list[Record]:
    """Files matching ``pattern`` (``**`` recursive), sorted. A file reached through several
    paths (a symlink loop such as ``loop -> ..`` makes ``**`` find it again and again) is
    listed once, by its shortest path."""
    if not pattern:
        raise ConfigError("data=glob needs data.pattern, e.g. data.pattern='photos/**/*.jpg'")
    found = [p for p in globlib.glob(os.path.expanduser(pattern), recursive=True)
             if listable(p)]
    first: dict[str, str] = {}
    for p in sorted(found, key=lambda p: (p.count(os.sep), p)):
        first.setdefault(os.path.realpath(p), p)
    paths = sorted(first.values())
    if not paths:
        raise DataError(f"data.pattern={pattern!r} matches no files (relative to {os.getcwd()})")
    return [Record(p) for p in paths]


def listable(path: str | os.PathLike) -> bool:
    """Whether a path found in a folder is one of its images: a regular file, or a FIFO,
    socket or device where an image would be (listed, so that its row fails with the
    reason instead of the file vanishing from the run; never opened). Not folders, not
    broken links."""
    try:
        return not stat.S_ISDIR(os.stat(path).st_mode)
    except OSError:
        return False


def _read_synsets(path: Path) -> list[str]:
    # LOC_synset_mapping.txt: "n01440764 tench, Tinca tinca" per line, in class-index order.
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def _find(root: Path, given: str | None, names: tuple[str, ...]) -> Path | None:
    if given:
        if not Path(given).is_file():
            raise DataError(f"file {given!r} does not exist")
        return Path(given)
    for folder in (root, root.parent):
        for name in names:
            if (folder / name).is_file():
                return folder / name
    return None


def _wnid_index(wnids: list[str], synsets: Path | None, what: str) -> dict[str, int]:
    if synsets is not None:
        return {w: i for i, w in enumerate(_read_synsets(synsets))}
    unique = sorted(set(wnids))
    if len(unique) == 1000:  # all classes present: sorted wnids are torchvision's order
        return {w: i for i, w in enumerate(unique)}
    raise DataError(
        f"{what} names {len(unique)} of the 1000 classes, so class indices are ambiguous; "
        f"give data.synsets=/path/to/LOC_synset_mapping.txt"
    )


def _read_imagenet_val(root: str | None, labels: str | None, synsets: str | None) -> list[Record]:
    if not root:
        raise ConfigError("data=imagenet_val needs data.root=/path/to/imagenet/val")
    base = Path(root)
    if not base.is_dir():
        raise DataError(f"data.root={root!r} is not a directory")
    syn = _find(base, synsets, ("LOC_synset_mapping.txt",))
    dirs = sorted(d.name for d in base.iterdir() if d.is_dir())
    if dirs:  # class sub-folders, named by wnid (n01440764) or by class index
        if all(d.isdigit() for d in dirs):
            index = {d: int(d) for d in dirs}
        else:
            index = _wnid_index(dirs, syn, f"data.root {root!r}")
        unknown_dirs = [d for d in dirs if d not in index]
        if unknown_dirs:
            raise DataError(f"class folders {unknown_dirs[:3]} are not in the synset list")
        return [Record(str(p), index[d]) for d in dirs for p in sorted((base / d).iterdir())
                if listable(p)]
    files = sorted(p for p in base.iterdir() if listable(p) and p.suffix.lower() != ".txt"
                   and p.suffix.lower() != ".csv")
    if not files:
        raise DataError(f"data.root={root!r} has no images and no class folders")
    lab = _find(base, labels, ("LOC_val_solution.csv", "val_labels.txt", "labels.txt"))
    if lab is None:
        raise DataError(
            f"data.root={root!r} is a flat folder without labels: put LOC_val_solution.csv "
            f"beside it or give data.labels=FILE ('file label' lines)"
        )
    by_stem: dict[str, int] = {}
    if lab.suffix == ".csv":
        with open(lab, newline="") as f:
            rows = [(r["ImageId"], r["PredictionString"].split()[0]) for r in csv.DictReader(f)]
        index = _wnid_index([w for _, w in rows], syn, str(lab))
        by_stem = {img: index[w] for img, w in rows}
    else:
        lines = [line.split() for line in lab.read_text().splitlines() if line.strip()]
        if all(len(parts) == 1 for parts in lines):  # one label per line, sorted file order
            if len(lines) != len(files):
                raise DataError(f"{lab} has {len(lines)} labels for {len(files)} images")
            by_stem = {p.stem: int(parts[0]) for p, parts in zip(files, lines, strict=True)}
        else:
            by_stem = {Path(parts[0]).stem: int(parts[1]) for parts in lines}
    return [Record(str(p), by_stem.get(p.stem, -1)) for p in files]


def build_records(cfg: Any) -> list[Record]:
    """All images of ``cfg`` (the data group), in a stable order, before sharding."""
    if cfg.name == "samples":
        records = _read_samples()
    elif cfg.name == "glob":
        records = _read_glob(cfg.pattern)
    elif cfg.name == "imagenet_val":
        records = _read_imagenet_val(cfg.root, cfg.labels, cfg.synsets)
    else:
        from .errors import unknown

        raise ConfigError(unknown("data", cfg.name, ("samples", "glob", "imagenet_val")))
    return records[: cfg.limit] if cfg.limit is not None else records


def _srun_step() -> tuple[int, int] | None:
    """(task, tasks) of the srun step this process runs in, or None outside one.

    A batch script sees ``SLURM_NTASKS``/``SLURM_PROCID`` of its allocation but is one
    process: only srun's tasks (``SLURM_STEP_ID`` set) are shards of one step.
    """
    env = os.environ
    if "SLURM_STEP_ID" not in env or "SLURM_PROCID" not in env:
        return None
    tasks = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or 1)
    return int(env["SLURM_PROCID"]), tasks


def shard_of(cfg: Any) -> tuple[int, int]:
    """(shard, num_shards): from the config, else from the srun step, else (0, 1)."""
    step = _srun_step()
    if cfg.num_shards is not None and cfg.num_shards > 1:
        if cfg.shard is None:
            if step is not None and step[1] == cfg.num_shards:
                return step[0], cfg.num_shards
            raise ConfigError(
                f"data.num_shards={cfg.num_shards} needs data.shard=0..{cfg.num_shards - 1}"
                + (" (or srun with as many tasks)" if step is None else
                   f" (this srun step has {step[1]} tasks)")
            )
        return cfg.shard, cfg.num_shards
    if cfg.num_shards is None and step is not None and step[1] > 1:
        return step
    ntasks = int(os.environ.get("SLURM_NTASKS", "1") or 1)
    if cfg.num_shards is None and step is None and ntasks > 1:
        log.warning("SLURM_NTASKS=%d but this process is not an srun task: it processes every "
                    "image itself; start it with srun to split the work into %d shards",
                    ntasks, ntasks)
    return 0, 1


def shard_range(n: int, shard: int, num_shards: int) -> tuple[int, int]:
    """Contiguous [start, stop) of ``n`` images for one shard; sizes differ by at most one."""
    base, extra = divmod(n, num_shards)
    start = shard * base + min(shard, extra)
    return start, start + base + (shard < extra)


def native_size(size: tuple[int, int], max_side: int | None) -> tuple[int, int]:
    """The model input (height, width) of a native-resolution run for an image of upright
    ``size``: the image's own, or scaled down (aspect kept, :func:`~pipeline.images.capped`
    rounding) so that its longest side is ``max_side``."""
    h, w = int(size[0]), int(size[1])
    if not max_side or max(h, w) <= max_side:
        return h, w
    cw, ch = capped(w, h, max_side)
    return ch, cw


def native_sizes(records: list[Record], max_side: int | None,
                 threads: int = 8) -> tuple[np.ndarray, dict[int, str]]:
    """Each record's model input size at native resolution, from the image headers alone
    (nothing is decoded; a few threads overlap the file reads).

    Returns:
        ((N, 2) int32 heights and widths, 0 where the header does not read; position ->
        reason for those).
    """
    def one(rec: Record) -> tuple[int, int] | str:
        try:
            return native_size(header_size(rec.path), max_side)
        except Exception as e:  # the image's failure, recorded as its row's reason
            return _reason(e)

    sizes = np.zeros((len(records), 2), dtype=np.int32)
    reasons: dict[int, str] = {}
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for i, found in enumerate(pool.map(one, records)):
            if isinstance(found, str):
                reasons[i] = found
            else:
                sizes[i] = found
    return sizes, reasons


class SizeBatches(Sampler[list[int]]):
    """Batches of dataset positions whose images share one input size (native resolution).

    Positions are grouped by size in order of first appearance, each group cut into
    batches of ``batch_size`` in position order; so a folder of mixed sizes runs in full
    batches wherever a size repeats, and only each size's last batch may be short.
    """

    def __init__(self, sizes: np.ndarray, batch_size: int) -> None:
        groups: dict[tuple[int, int], list[int]] = {}
        for pos, (h, w) in enumerate(np.asarray(sizes).reshape(-1, 2).tolist()):
            groups.setdefault((h, w), []).append(pos)
        self.batches = [g[i:i + batch_size] for g in groups.values()
                        for i in range(0, len(g), batch_size)]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class ImageDataset(Dataset):
    """Items: index, uint8 pixels (3, S, S) (None for a JPEG decoded on the device, whose
    bytes are ``jpeg``), original size, input box, label, error.

    At native resolution (``resize=None``) pixels are (3, h, w) at the size reserved for
    the image when its results file was created (``input_sizes``, indexed like
    ``records``); an image whose size changed since then is an item with an error.

    Each item carries ``content``: the file's content hash, size and mtime (uint64; zeros
    where it was not read), from the very bytes decoded. ``expected`` (content hashes
    indexed like ``records``, 0 = none) makes an image whose bytes hash otherwise an item
    with an error: a stage that reads a run's images again (evaluate) sees a changed file.
    """

    def __init__(self, records: list[Record], indices: np.ndarray, image_size: int,
                 resize: str | None, decode: str = "cpu", input_sizes: np.ndarray | None = None,
                 max_side: int | None = None, expected: np.ndarray | None = None) -> None:
        if resize is None and input_sizes is None:
            raise ValueError("a native-resolution dataset needs each image's input size")
        self.records = records
        self.indices = np.asarray(indices, dtype=np.int64)
        self.size = image_size
        self.resize = resize
        self.decode = decode  # "device": plain JPEGs travel as bytes, decoded by the loop
        self.input_sizes = None if input_sizes is None else np.asarray(input_sizes)
        self.max_side = max_side
        self.expected = None if expected is None else np.asarray(expected, np.uint64)

    def batches(self, batch_size: int) -> SizeBatches | None:
        """The batch sampler of a native-resolution dataset (None: plain batches)."""
        if self.resize is not None or self.input_sizes is None:
            return None
        return SizeBatches(self.input_sizes[self.indices], batch_size)

    def loader(self, batch_size: int, workers: int, device: torch.device) -> DataLoader:
        """The DataLoader extract and evaluate read: batches of ``batch_size`` (at native
        resolution, of equal input size, in row order within a size), pinned for CUDA,
        workers that leave SLURM's and Ctrl-C's signals to the main process."""
        from .runtime import worker_init

        sizes = self.batches(batch_size)
        batching: dict[str, Any] = ({"batch_sampler": sizes} if sizes is not None
                                    else {"batch_size": batch_size})
        return DataLoader(self, num_workers=workers, collate_fn=collate,
                          pin_memory=device.type == "cuda", worker_init_fn=worker_init,
                          **batching)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        index = int(self.indices[i])
        rec = self.records[index]
        if self.resize is None:
            return self._native(index, rec)
        s = self.size
        item = {"index": index, "label": rec.label, "error": "", "jpeg": None,
                "size": torch.zeros(2, dtype=torch.int32), "box": torch.zeros(4),
                "pixels": torch.zeros(3, s, s, dtype=torch.uint8),
                "content": np.zeros(3, np.uint64)}
        if self.decode == "device" and self._jpeg_bytes(rec.path, item):
            return self._checked(item)
        try:
            # JPEG draft decoding skips detail, but never below the region resized to s x s:
            # for center_crop that is 0.875 of the shorter side, so the decode must keep
            # s / 0.875 pixels there, or the crop would be upsampled from a coarser decode.
            draft = s if self.resize == "square" else math.ceil(s / CROP_RATIO)
            im, (h, w), facts = read_image(rec.path, draft_size=draft)
            _note(item, facts)
            box = input_box((h, w), s, self.resize)
            # Map the box from original to (possibly draft-reduced) decoded coordinates.
            sy, sx = im.height / h, im.width / w
            crop = (box[1] * sx, box[0] * sy, box[3] * sx, box[2] * sy)
            im = im.resize((s, s), Image.Resampling.BILINEAR, box=crop)
            item["pixels"] = torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1)
            item["size"] = torch.tensor([h, w], dtype=torch.int32)
            item["box"] = torch.tensor(box, dtype=torch.float32)
        except Exception as e:  # any decoder failure is this image's, not the run's
            item["error"] = _reason(e)
        return self._checked(item)

    def _checked(self, item: dict[str, Any]) -> dict[str, Any]:
        """``item``, failed if its bytes are not those ``expected``."""
        if self.expected is None or item["error"]:
            return item
        want, got = int(self.expected[item["index"]]), int(item["content"][0])
        if want and got != want:
            item["error"] = (f"the file changed since it was read for this run (content "
                             f"{CONTENT_HASH} {got:016x}, stored {want:016x})")
        return item

    def _native(self, index: int, rec: Record) -> dict[str, Any]:
        """The image at its own size (capped by ``max_side``), decoded on the CPU."""
        assert self.input_sizes is not None
        th, tw = (int(v) for v in self.input_sizes[index])
        item = {"index": index, "label": rec.label, "error": "", "jpeg": None,
                "size": torch.zeros(2, dtype=torch.int32), "box": torch.zeros(4),
                "pixels": torch.zeros(3, th, tw, dtype=torch.uint8),
                "content": np.zeros(3, np.uint64)}
        try:
            im, (h, w), facts = read_image(rec.path, max_side=self.max_side)
            _note(item, facts)
            if (im.height, im.width) != (th, tw):
                item["error"] = (f"the image is {h}x{w} now, input {im.height}x{im.width}; "
                                 f"{th}x{tw} was reserved when the run was created (rerun "
                                 "with overwrite=true)")
                return item
            item["pixels"] = torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1)
            item["size"] = torch.tensor([h, w], dtype=torch.int32)
            item["box"] = torch.tensor([0.0, 0.0, h, w], dtype=torch.float32)
        except Exception as e:  # any decoder failure is this image's, not the run's
            item["error"] = _reason(e)
        return self._checked(item)

    def _jpeg_bytes(self, path: str, item: dict[str, Any]) -> bool:
        """Route the file (:func:`~pipeline.device_decode.route`): a sound JPEG that nvJPEG's
        batched path takes travels as bytes, size and box, without pixels; a damaged one
        fails here with its reason. False: PIL decodes it in this worker."""
        try:
            st = check_regular(path)  # a FIFO must not reach route's open
        except (OSError, ValueError) as e:
            item["error"] = _reason(e)
            return True
        routed = route(path)
        if routed.where == "failed":
            item["error"] = routed.why
            return True
        if routed.where == "host":
            return False
        item["jpeg"], item["pixels"] = routed.data, None
        # The bytes the device decodes; the stat of just before route read them.
        _note(item, FileFacts(st.st_size, st.st_mtime_ns, content_hash(routed.data.numpy())))
        item["size"] = torch.tensor(routed.size, dtype=torch.int32)
        item["box"] = torch.tensor(input_box(routed.size, self.size, self.resize),
                                   dtype=torch.float32)
        return True


def _note(item: dict[str, Any], facts: FileFacts) -> None:
    item["content"] = np.array([facts.content_hash, facts.size, facts.mtime_ns], np.uint64)


def _reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:250] or type(e).__name__


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """One batch. ``pixels`` stacks the rows decoded in the worker (all rows, but for
    ``decode=device`` JPEGs, which carry ``jpeg`` bytes instead), ``host`` their positions;
    :func:`~pipeline.device_decode.batch_pixels` makes the device batch of all rows."""
    host = [i for i, it in enumerate(items) if it["pixels"] is not None]
    return {
        "index": torch.tensor([it["index"] for it in items], dtype=torch.int64),
        "label": torch.tensor([it["label"] for it in items], dtype=torch.int64),
        "pixels": torch.stack([items[i]["pixels"] for i in host]) if host else None,
        "host": torch.tensor(host, dtype=torch.int64),
        "size": torch.stack([it["size"] for it in items]),
        "box": torch.stack([it["box"] for it in items]),
        "error": [it["error"] for it in items],
        "jpeg": [it["jpeg"] for it in items],
        "content": np.stack([it["content"] for it in items]),  # hash, size, mtime (uint64)
    }
