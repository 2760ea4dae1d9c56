"""Photos from disk, without torch: decoding (upright, RGB, optionally reduced) and the
region of a photo that the model sees. Shared by the data loader (extract, evaluate) and
by the stages that must not import torch (render, report)."""

from __future__ import annotations

import io
import math
import os
import stat
from dataclasses import dataclass

import numpy as np
import xxhash
from PIL import Image, UnidentifiedImageError

CROP_RATIO = 0.875  # ImageNet evaluation: resize to 256, center crop 224
_T = Image.Transpose
_EXIF_TRANSPOSE = {2: _T.FLIP_LEFT_RIGHT, 3: _T.ROTATE_180, 4: _T.FLIP_TOP_BOTTOM,
                   5: _T.TRANSPOSE, 6: _T.ROTATE_270, 7: _T.TRANSVERSE, 8: _T.ROTATE_90}


CONTENT_HASH = "xxh3_64"  # of each image file's bytes, as stored in /images/content_hash
_SPECIAL = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
            (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
            (stat.S_ISDIR, "a directory"))


class NotAFile(ValueError):
    """An image path that is a FIFO, socket, device or directory: never opened (a FIFO
    would block its reader forever, a device may never end)."""


@dataclass(frozen=True)
class FileFacts:
    """What identifies an image file's content: its size and mtime (from one ``fstat``
    of the handle its bytes were read from) and the xxh3_64 hash of those bytes."""

    size: int
    mtime_ns: int
    content_hash: int


def check_regular(path: str, st: os.stat_result | None = None) -> os.stat_result:
    """``path``'s stat if it is a regular file (symlinks followed); else :class:`NotAFile`."""
    st = os.stat(path) if st is None else st
    if not stat.S_ISREG(st.st_mode):
        what = next((name for test, name in _SPECIAL if test(st.st_mode)), "a special file")
        raise NotAFile(f"{path} is {what}, not a regular file (not opened)")
    return st


def content_hash(data: bytes | bytearray | memoryview | np.ndarray) -> int:
    """The stored content hash of a file's bytes (xxh3_64, as an unsigned integer)."""
    return xxhash.xxh3_64_intdigest(data)


def read_file(path: str) -> tuple[bytes, FileFacts]:
    """A regular file's bytes and facts, read once. Special files fail before any open
    (a stat), and the handle is checked again, so a FIFO swapped in between blocks nothing
    (opened non-blocking)."""
    check_regular(path)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = check_regular(path, os.fstat(fd))
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read()
    finally:
        os.close(fd)
    return data, FileFacts(st.st_size, st.st_mtime_ns, content_hash(data))


def open_image(path: str, draft_size: int | None = None,
               max_side: int | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """:func:`read_image` without the file's facts."""
    rgb, size, _ = read_image(path, draft_size, max_side)
    return rgb, size


def read_image(path: str, draft_size: int | None = None, max_side: int | None = None
               ) -> tuple[Image.Image, tuple[int, int], FileFacts]:
    """Decode to RGB, upright per EXIF; returns the image, the original (height, width) and
    the file's facts (size, mtime, content hash of exactly the bytes decoded). The file is
    read once; a FIFO, socket or device raises :class:`NotAFile` unopened.

    Args:
        path: The image file.
        draft_size: Let the JPEG decoder skip detail finer than this many pixels (DCT
            scaling: 1/2, 1/4 or 1/8 of the size, never below ``draft_size``), which makes
            big photos several times cheaper to decode. The image may stay larger.
        max_side: Return the image reduced so that its longest side is at most this many
            pixels (aspect ratio kept). JPEGs are decoded reduced (draft) first, so a huge
            photo never exists in memory at full size; other formats are decoded in full,
            8 bits per channel, and reduced at once.

    Returns:
        (RGB image, (height, width) of the original, upright, file facts).
    """
    data, facts = read_file(path)
    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:  # PIL would name the in-memory buffer, not the file
        raise UnidentifiedImageError(f"cannot identify image file {path!r}") from None
    with im:
        orientation = im.getexif().get(0x0112, 1)
        full_w, full_h = im.size
        request = (draft_size, draft_size) if draft_size else (0, 0)
        if max_side and max(full_w, full_h) > max_side:  # the reduced size, at least
            scale = max_side / max(full_w, full_h)
            request = (max(request[0], math.ceil(full_w * scale)),
                       max(request[1], math.ceil(full_h * scale)))
        if min(request) > 0 and im.format == "JPEG" and im.mode in ("RGB", "L", "CMYK"):
            im.draft(None, request)
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            # PIL clips 16-bit values when converting to 8 bits; scale them instead.
            arr = np.asarray(im, dtype=np.float64)
            peak = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
            im = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8))
        if im.mode != "RGB":
            im = im.convert("RGB")
        im.load()
        # The size follows from the original's, not the draft's: the same photo always
        # comes out at the same size (what a native-resolution run reserves).
        size = capped(full_w, full_h, max_side) if max_side else im.size
        if max_side and max(full_w, full_h) > max_side and im.size != size:
            # Reduced straight from the decoded image: no full-size RGB copy is made.
            # reducing_gap: an integer box reduction first, then an antialiased resize.
            rgb = im.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
        else:
            rgb = im.copy()  # the decoded file's image is released when it closes
    if orientation in _EXIF_TRANSPOSE:
        rgb = rgb.transpose(_EXIF_TRANSPOSE[orientation])
        if orientation >= 5:  # quarter turns swap height and width
            full_h, full_w = full_w, full_h
    return rgb, (full_h, full_w), facts


def header_size(path: str) -> tuple[int, int]:
    """The upright (height, width) of an image from its header alone (nothing decoded)."""
    check_regular(path)  # a FIFO would block PIL's open
    with Image.open(path) as im:
        w, h = im.size
        if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # quarter turns swap the sides
            w, h = h, w
    return h, w


def capped(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(width, height) scaled down, aspect kept, to at most ``max_side`` on the longest.

    The longest side becomes ``max_side`` exactly; the other is ``round(side * max_side /
    longest)`` (Python's round: halves to even), at least 1.
    """
    scale = min(1.0, max_side / max(width, height, 1))
    return max(1, round(width * scale)), max(1, round(height * scale))


def input_box(
    size: tuple[int, int], image_size: int, resize: str
) -> tuple[float, float, float, float]:
    """The region (y0, x0, y1, x1) of the original image that the model sees."""
    h, w = size
    if resize == "square":
        return 0.0, 0.0, float(h), float(w)
    side = min(h, w) * CROP_RATIO  # center crop of 224/256 of the shorter side
    y0, x0 = (h - side) / 2, (w - side) / 2
    return y0, x0, y0 + side, x0 + side
