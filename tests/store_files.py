"""Small results files written through camsweep's own store (no model, no torch): fixed-size
or ragged, whole or as shards, for tests of the format's checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.store import ResultsWriter, create_results

# Four images; their ragged layer-map shapes, and input sizes 8 times larger.
RAGGED_SHAPES = np.array([[3, 4], [4, 4], [2, 5], [3, 3]])


def _tables(n: int) -> dict[str, tuple[tuple[int, ...], type]]:
    return {"targets/class": ((), np.int32), "targets/score": ((), np.float32),
            "predictions/class": ((2,), np.int32), "predictions/prob": ((2,), np.float32)}


def make_results(path: Path, n: int = 4, ragged: bool = False, input_map: bool = False,
                 first: int = 0, total: int | None = None, seed: int = 0) -> dict[str, list]:
    """Write ``path`` with ``n`` done rows (a shard when ``total`` > ``n``); returns the
    stored maps, {dataset: [row arrays]}."""
    total = n if total is None else total
    rng = np.random.default_rng(seed)
    method, key = ("saliency", "saliency/input") if input_map else ("gradcam", "gradcam/layer4")
    shapes = RAGGED_SHAPES[first:first + n] if ragged else np.tile([3, 4], (n, 1))
    sizes = shapes * 8
    layout = {**_tables(n), key: ((tuple(sizes[0]) if input_map else (3, 4)), np.float32)}
    attrs = {"method": method, "target_layers": [] if input_map else ["layer4"],
             "fingerprint": "{}", "listing_sha256": "0", "n_total": total,
             "first_index": first, "shard": 0, "num_shards": 1}
    rows_shape = sizes if input_map else shapes
    create_results(path, [f"img{first + i}.jpg" for i in range(n)], np.zeros(n),
                   np.arange(first, first + n), layout, attrs,
                   method_kind="input" if input_map else "cam",
                   ragged={key: rows_shape} if ragged else None,
                   input_size=sizes if ragged else None)
    maps = [rng.random(tuple(s)).astype(np.float32) for s in rows_shape]
    arrays = {"targets/class": np.arange(n, dtype=np.int32),
              "targets/score": rng.random(n).astype(np.float32),
              "predictions/class": np.zeros((n, 2), np.int32),
              "predictions/prob": rng.random((n, 2)).astype(np.float32),
              "images/size": sizes.astype(np.int32), "images/nonfinite": np.zeros(n, np.uint8),
              "images/box": np.tile(np.float32([0, 0, 1, 1]), (n, 1)),
              key: maps if ragged else np.stack(maps)}
    with ResultsWriter(path) as w:
        w.write(np.arange(n), arrays, {})
    return {key: maps}


def make_shards(run_dir: Path, ragged: bool = False) -> None:
    """Two shards of a four-image run, as ``results.shard-<i>-of-2.h5``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for shard in range(2):
        make_results(run_dir / f"results.shard-{shard}-of-2.h5", n=2, ragged=ragged,
                     first=2 * shard, total=4, seed=shard)
