"""The results file: one HDF5 file per run (format "camsweep", version 1, or 2 for runs at
native resolution with ragged maps). This package is the one owner of the on-disk formats:
creation, validation, typed readers, the writers, shard merging's file writes and the one
atomic-replace helper every stage uses. No other module calls ``h5py.File``. The spec is
docs/FORMAT.md.

Crash safety comes from the layout, not from luck: the file is built complete (every
dataset at its final shape, storage allocated up front and its disk blocks reserved, no
compression) under a temporary name and renamed into place. During the run, writes touch
raw data only, never HDF5 metadata, and a row's status is set only after its arrays were
flushed without error. A process killed at any moment therefore leaves a file that opens,
whose "done" rows are complete; the rest are recomputed on resume. Ragged maps keep this:
their flat values are sized exactly, and every image's offset fixed, at creation, so a
row's values always go to the same place, whoever writes them and when.

Modules: ``format`` (names, kinds, root attributes), ``dims`` (axis names), ``create``,
``validate`` and ``received`` (checks of files you are sent), ``ragged``, ``read``, ``write``,
``checksums`` and ``audit`` (row checksums, ``stage=verify``), ``mergefile``, ``space`` and
``isolate`` (full disks, file-size limits), ``atomic`` (write a temporary, then replace).
Import from ``pipeline.store``: the names below are its public interface.

One writer per file (``pipeline.locks.writer_lock``). Writers open without HDF5's own file
lock, so readers can watch a run that is being written.
"""

from .atomic import atomic_output, remove_temporaries, temporary_name, write_text_atomic
from .audit import FileCheck, verify_results
from .checksums import CHECKSUMS, checksummed, sums_of
from .create import chunk_rows, create_results, estimated_size, remove_stale_temporaries
from .dims import DIMS, SCALE_ATTRS, attach_dims, dataset_dims
from .format import (
    ACTIVATIONS,
    ATTRIBUTION,
    CHUNK_BYTES,
    DONE,
    ERROR_BYTES,
    ERROR_STR,
    FAILED,
    FIXED_VERSION,
    FORMAT,
    FORMAT_VERSION,
    IMAGE_TABLES,
    INPUT_MAP,
    INPUT_SIZE,
    LAYER_MAP,
    LAYOUTS_ATTR,
    MAP_KINDS,
    PENDING,
    RAGGED,
    RAGGED_VERSION,
    REQUIRED,
    STATUS_NAMES,
    STR,
    WEIGHTS,
    MapInfo,
    attr_list,
    categories,
    identity,
    is_scale,
    kind_of,
    layouts_attr,
    read_layouts,
    stored_config,
    stored_maps,
    walk,
)
from .isolate import run_isolated
from .ragged import check_ragged, is_ragged, map_ndim, ragged_keys, row_shape
from .read import open_results, read_column, read_map, read_map_rows, read_rows, read_table
from .received import check_contained, check_map_types
from .space import check_room, size_limit, write_error
from .validate import check_format, check_own_maps, check_shards, validate
from .write import BackgroundWriter, ResultsWriter, mark_pending

__all__ = [
    "ACTIVATIONS", "ATTRIBUTION", "CHUNK_BYTES", "DIMS", "DONE", "ERROR_BYTES", "ERROR_STR",
    "FAILED", "FIXED_VERSION", "FORMAT", "FORMAT_VERSION", "IMAGE_TABLES", "INPUT_MAP",
    "INPUT_SIZE", "LAYER_MAP", "LAYOUTS_ATTR", "MAP_KINDS", "PENDING", "RAGGED",
    "RAGGED_VERSION", "REQUIRED", "SCALE_ATTRS", "STATUS_NAMES", "STR", "WEIGHTS",
    "BackgroundWriter", "MapInfo", "ResultsWriter", "atomic_output", "attach_dims",
    "attr_list", "categories", "check_format", "check_own_maps", "check_ragged",
    "check_shards", "chunk_rows", "create_results", "dataset_dims", "identity", "is_ragged",
    "is_scale", "kind_of", "layouts_attr", "map_ndim", "open_results", "ragged_keys",
    "read_layouts", "read_map", "read_map_rows", "read_rows", "remove_stale_temporaries",
    "remove_temporaries", "row_shape", "stored_config", "stored_maps", "temporary_name",
    "validate", "walk", "write_error", "write_text_atomic",
    "CHECKSUMS", "FileCheck", "check_contained", "check_map_types", "check_room", "checksummed",
    "estimated_size", "read_column", "read_table", "run_isolated", "size_limit", "sums_of",
    "mark_pending", "verify_results",
]
