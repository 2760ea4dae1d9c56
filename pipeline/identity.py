"""Run identity: which results a run directory holds and whether a run may resume them.

A results file records the values of every config key that decides a stored number (its
fingerprint, with a checkpoint named by its content) and the image list it was created
from; a resume with either changed is refused with the differences named, never mixed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .config import target_spec
from .data import Record
from .errors import RunRefused, StoreError
from .models import checkpoint_digest
from .store import open_results, read_column

log = logging.getLogger(__name__)

# Run identity: the config keys that decide a stored number. A results file records their
# values (its fingerprint); resuming it with any of them changed is refused. Every other key
# (batch_size, micro_batch, device, num_workers, channels_last, compile, stage, run_dir,
# resume, overwrite, merge_copy, render.*, evaluate.*, report.*) may change on resume, and so
# may data.shard / data.num_shards (all shards of a run share one identity).
RESULT_KEYS = ("model", "method", "data", "target", "topk", "precision", "seed")


def fingerprint(cfg: DictConfig) -> str:
    """The settings that decide the numbers; equal for all shards of one run."""
    sub = {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k])
           else cfg[k] for k in RESULT_KEYS}
    # data.max_side left out while null: runs made before the key keep their fingerprint.
    sub["data"] = {k: v for k, v in sub["data"].items() if k not in ("shard", "num_shards")
                   and not (k == "max_side" and v is None)}
    # Only what decides the classes explained: target.k matters for topk alone.
    sub["target"] = target_spec(cfg.target)
    if sub["target"] == "topk":
        sub["target_k"] = cfg.target.k
    # What is explained of it; absent for the logit, so runs made before target.score
    # existed (all logit) keep their fingerprint and resume.
    if cfg.target.get("score", "logit") != "logit":
        sub["target_score"] = cfg.target.score
    # A checkpoint file is named by its content, not its path: one overwritten before a
    # resume (a training run's last.pt) is another model.
    digest = checkpoint_digest(cfg.model.weights)
    if digest is not None:
        sub["model"]["weights_content"] = digest
    return json.dumps(sub, sort_keys=True)


def differences(old: str, new: str) -> list[str]:
    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(d, dict):
            return {k2: v2 for k, v in d.items() for k2, v2 in flat(v, f"{prefix}{k}.").items()}
        return {prefix.rstrip("."): d}

    a, b = flat(json.loads(old)), flat(json.loads(new))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)]


def config_diff(old: str, new: str) -> str:
    """The first differences between two fingerprints, for a refusal's one line."""
    return "; ".join(differences(old, new)[:4]) if old else "no fingerprint"


def listing_digest(records: list[Record]) -> str:
    """sha256 of the whole image list (paths and labels, in order): what fixes a run's rows."""
    h = hashlib.sha256()
    for r in records:
        h.update(f"{r.path}\0{r.label}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def listing_change(f: Any, records: list[Record], start: int, stop: int) -> str | None:
    """Why the current listing differs from the one the file was created from, or None."""
    stored = f.attrs.get("listing_sha256")
    if stored is not None:
        if stored == listing_digest(records):
            return None
    else:  # files of before the digest: compare the file's own block
        block = records[start:stop]
        if (len(block) == len(f["images/path"])
                and [r.path for r in block] == list(read_column(f, "images/path"))
                and [r.label for r in block] == read_column(f, "images/label").tolist()):
            return None
    n_total = int(f.attrs.get("n_total", len(f["images/path"])))
    if int(f.attrs.get("num_shards", 1)) > 1:
        return (f"the image list changed since this sharded run was created ({len(records)} "
                f"files now, {n_total} then, or the same count in another order or labels)")
    old, new = set(read_column(f, "images/path")), {r.path for r in records}
    added, removed = len(new - old), len(old - new)
    if added or removed:
        return (f"the image list changed since this run was created: {added} file(s) added, "
                f"{removed} removed")
    return "the image list changed since this run was created: same files, other order or labels"


def check_existing(path: Path, cfg: DictConfig, records: list[Record], start: int,
                    stop: int) -> bool:
    """Whether ``path`` is to be (re)created. A results file of the same config and image
    list is resumed; one of another config or list is refused (overwrite=true replaces it,
    atomically, once the new one is complete). Never overwrites silently."""
    if not path.exists():
        return True
    try:
        with open_results(path) as f:
            old = str(f.attrs.get("fingerprint", ""))
            changed = listing_change(f, records, start, stop)
            merged = "merged_from" in f.attrs
        if merged and not cfg.overwrite:  # its rows live in the shard files
            raise RunRefused(f"{path} is a merge of shards; rerun the shards (data.shard=i "
                             "data.num_shards=N) to complete them, or use another run_dir")
    except StoreError:
        if not cfg.overwrite:
            raise
        log.warning("overwrite=true: replacing the unreadable %s", path)
        return True
    new = fingerprint(cfg)
    if cfg.overwrite:
        log.warning("overwrite=true: replacing %s", path)
        return True
    how = "Use another run_dir, or overwrite=true to replace it"
    if old != new:
        raise RunRefused(f"{path} holds results of a different config: "
                         f"{config_diff(old, new)}. {how}")
    if not cfg.resume:
        raise RunRefused(f"{path} exists and resume=false. {how}")
    if changed:
        raise RunRefused(f"{path}: {changed}; a run's rows are fixed when it is created. Use "
                         "another run_dir for the new list, or overwrite=true to start over")
    return False


def check_sibling_shards(path: Path, cfg: DictConfig, records: list[Record],
                          num_shards: int) -> None:
    """A new shard file must describe the same run as the shards already there: one config
    and one image list, or the merge would join blocks of two different lists."""
    digest, new = listing_digest(records), fingerprint(cfg)
    for other in sorted(path.parent.glob(f"results.shard-*-of-{num_shards}.h5")):
        if other == path:
            continue
        with open_results(other) as f:
            old = str(f.attrs.get("fingerprint", ""))
            if old != new:
                raise RunRefused(f"{other.name} in {path.parent} holds results of a different "
                                 f"config: {config_diff(old, new)}. Use another run_dir")
            if f.attrs.get("listing_sha256") != digest:
                raise RunRefused(
                    f"{other.name} in {path.parent} was made from another image list "
                    f"({len(records)} files now, {int(f.attrs.get('n_total', -1))} then, or "
                    "the same count in another order); all shards of a run share one list. "
                    "Use another run_dir")
