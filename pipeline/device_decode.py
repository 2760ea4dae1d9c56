"""``data.decode=device``: JPEGs decoded, cropped and resized on the run's device.

Where the work happens:

* Loader workers (:func:`route`) read each file and check its JPEG marker structure on the
  host (:func:`inspect_jpeg`, a scan of the bytes, no decoding). A damaged stream becomes a
  failed row with a reason: nvJPEG's batched decoder can report success on a truncated or
  broken stream and return a garbage picture, which would be stored as done. A sound stream
  that the batched decoder cannot take (progressive, lossless, arithmetic-coded, 12-bit,
  CMYK, EXIF-rotated, ...; :func:`host_only`) is decoded by PIL in the worker, like
  ``decode=cpu``. The rest travel as bytes plus size and box, without pixels.
* :func:`~pipeline.data.collate` stacks only the pixels of host-decoded rows; the main
  process (:func:`batch_pixels`) copies them into a device batch and decodes the JPEG rows
  into it in one batched call, then crops and resizes them with one interpolation per group
  of equal decoded size and box (:func:`decode_into`).
* :func:`decode_ahead` prepares batch i+1 (copy, decode, resize) on a side CUDA stream while
  the model works on batch i.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torchvision
from PIL import Image

from .errors import ConfigError

SOI, EOI, SOS, DQT, DHT, APP1, APP14 = 0xD8, 0xD9, 0xDA, 0xDB, 0xC4, 0xE1, 0xEE
# Frame headers (start of frame) by marker: all SOFn but DHT (C4), JPG (C8) and DAC (CC).
FRAMES = {0xC0: "baseline", 0xC1: "extended sequential", 0xC2: "progressive",
          0xC3: "lossless", 0xC5: "differential sequential", 0xC6: "differential progressive",
          0xC7: "differential lossless", 0xC9: "arithmetic sequential",
          0xCA: "arithmetic progressive", 0xCB: "arithmetic lossless",
          0xCD: "differential arithmetic sequential",
          0xCE: "differential arithmetic progressive",
          0xCF: "differential arithmetic lossless"}
DEVICE_FRAMES = (0xC0, 0xC1)  # Huffman sequential: what nvJPEG's batched decoder decodes


class DamagedJpeg(ValueError):
    """A stream that starts as a JPEG but whose marker structure is broken or cut short."""


@dataclass(frozen=True)
class JpegStream:
    """What :func:`inspect_jpeg` learns from a sound JPEG stream's headers."""

    frame: int  # SOFn marker byte, a key of FRAMES
    precision: int  # bits per sample
    height: int  # 0: given later by a DNL segment
    width: int
    components: int
    scans: int
    orientation: int  # EXIF orientation, 1 (upright) without EXIF
    adobe_transform: int | None  # APP14 Adobe colour transform (0: RGB/CMYK as stored)
    huffman_tables: bool  # any DHT segment (without: the standard tables are implied)
    extraneous: bool  # bytes between segments that libjpeg skips with a warning


def _damaged(why: str) -> DamagedJpeg:
    return DamagedJpeg(f"damaged JPEG: {why}")


def _scan_end(data: bytes | bytearray, pos: int) -> int:
    """Offset of the marker that ends the entropy-coded data starting at ``pos``.

    In entropy-coded data a 0xFF byte is followed by 0x00 (a stuffed 0xFF), a restart marker
    (RST0-7) or fill bytes (0xFF); anything else is the next marker.
    """
    n = len(data)
    while True:
        j = data.find(b"\xff", pos)
        if j < 0 or j + 1 >= n:
            raise _damaged(f"file ends inside the image data (truncated after {n} bytes)")
        b = data[j + 1]
        if b == 0xFF:
            pos = j + 1
        elif b == 0x00 or 0xD0 <= b <= 0xD7:
            pos = j + 2
        else:
            return j


def _orientation(segment: bytes | bytearray) -> int:
    """EXIF orientation tag of an APP1 Exif segment's payload; 1 where it has none."""
    try:
        exif = Image.Exif()
        exif.load(bytes(segment))
        return int(exif.get(0x0112, 1))
    except Exception:  # an unreadable EXIF block: PIL's decode ignores it too
        return 1


def inspect_jpeg(data: bytes | bytearray) -> JpegStream:
    """Check a JPEG stream's whole marker structure, without decoding it.

    SOI first; then segments, each with a length that fits in the file; one frame header
    (SOFn) with a non-zero width and 1-4 components; quantization tables; at least one scan
    (SOS), whose entropy-coded data runs up to a marker; EOI last (bytes after EOI are
    ignored, as decoders do). A file cut anywhere fails.

    Args:
        data: The file's bytes.

    Returns:
        The stream's frame type, sample precision, size, component and scan counts and the
        tags that decide whether nvJPEG's batched path may take it (:func:`host_only`).

    Raises:
        DamagedJpeg: The structure is broken; the message says where, for the row's reason.
    """
    n = len(data)
    if n < 2 or data[0] != 0xFF or data[1] != SOI:
        raise _damaged("no SOI marker at the start" if n else "empty file")
    pos, frame, scans, quant, huffman, extraneous = 2, None, 0, False, False, False
    orientation, adobe = 1, None
    while True:
        if pos >= n:
            raise _damaged(f"no EOI marker: file ends after {n} bytes (truncated)")
        if data[pos] != 0xFF:  # garbage before a marker: libjpeg warns and skips it
            extraneous = True
            pos = data.find(b"\xff", pos)
            if pos < 0:
                raise _damaged(f"no EOI marker: file ends after {n} bytes (truncated)")
            continue
        while pos < n and data[pos] == 0xFF:  # fill bytes before a marker
            pos += 1
        if pos >= n:
            raise _damaged(f"no EOI marker: file ends after {n} bytes (truncated)")
        marker, at = data[pos], pos - 1
        pos += 1
        if marker == EOI:
            if frame is None or scans == 0:
                raise _damaged(f"EOI at byte {at} before any image data")
            break
        if marker in (SOI, 0x00):
            raise _damaged(f"unexpected marker 0xFF{marker:02X} at byte {at}")
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # RSTn, TEM: no length, no payload
            continue
        if pos + 2 > n:
            raise _damaged(f"file ends inside the header of segment 0xFF{marker:02X} "
                           f"(truncated after {n} bytes)")
        length = data[pos] << 8 | data[pos + 1]
        end = pos + length
        if length < 2:
            raise _damaged(f"segment 0xFF{marker:02X} at byte {at} has length {length}")
        if end > n:
            raise _damaged(f"segment 0xFF{marker:02X} at byte {at} runs past the end of the "
                           f"file ({length} bytes, {n - pos} left: truncated)")
        body = data[pos + 2:end]
        if marker in FRAMES:
            if frame is not None:
                raise _damaged(f"a second frame header at byte {at}")
            if len(body) < 6 or len(body) != 6 + 3 * body[5]:
                raise _damaged(f"frame header at byte {at} has a wrong length ({length})")
            precision, height = body[0], body[1] << 8 | body[2]
            width, components = body[3] << 8 | body[4], body[5]
            if width == 0 or not 1 <= components <= 4:
                raise _damaged(f"frame header gives width {width}, {components} components")
            frame = marker
        elif marker == SOS:
            if frame is None:
                raise _damaged(f"scan at byte {at} before the frame header")
            if not quant:
                raise _damaged("no quantization table before the first scan")
            if len(body) < 1 or not 1 <= body[0] <= 4 or len(body) != 4 + 2 * body[0]:
                raise _damaged(f"scan header at byte {at} has a wrong length ({length})")
            pos = _scan_end(data, end)
            if pos == end:
                raise _damaged(f"scan at byte {at} has no image data")
            scans += 1
            continue
        elif marker == DQT:
            quant = True
        elif marker == DHT:
            huffman = True
        elif marker == APP1 and body[:6] == b"Exif\x00\x00":
            orientation = _orientation(body)
        elif marker == APP14 and body[:5] == b"Adobe" and len(body) >= 12:
            adobe = body[11]
        pos = end
    return JpegStream(frame, precision, height, width, components, scans, orientation, adobe,
                      huffman, extraneous)


def host_only(stream: JpegStream) -> str | None:
    """Why nvJPEG's batched path must not take ``stream`` (PIL decodes it in the loader
    worker instead), or None where it may: 8-bit Huffman sequential (baseline or
    extended), one interleaved scan, grey or YCbCr, upright, standard layout."""
    if stream.frame not in DEVICE_FRAMES:
        return f"{FRAMES[stream.frame]} JPEG (SOF{stream.frame - 0xC0})"
    if stream.precision != 8:
        return f"{stream.precision}-bit samples"
    if stream.components not in (1, 3):
        return f"{stream.components} colour components (CMYK/YCCK)"
    if stream.components == 3 and stream.adobe_transform == 0:
        return "RGB-coded (Adobe transform 0), not YCbCr"
    if stream.scans != 1:
        return f"{stream.scans} scans (non-interleaved)"
    if stream.height == 0:
        return "height given in a DNL segment"
    if stream.orientation != 1:
        return f"EXIF orientation {stream.orientation} (rotated or mirrored)"
    if not stream.huffman_tables:
        return "no Huffman tables (implied standard ones)"
    if stream.extraneous:
        return "extraneous bytes between segments"
    return None


@dataclass(frozen=True)
class Routed:
    """Where a file's decode happens: ``device`` (``data`` holds its bytes, ``size`` its
    (height, width)), ``host`` (PIL in the worker; ``why`` says why) or ``failed``
    (``why`` is the row's reason)."""

    where: str
    why: str | None = None
    data: torch.Tensor | None = None
    size: tuple[int, int] | None = None


def route(path: str) -> Routed:
    """Read ``path`` and decide where it is decoded (see :class:`Routed`); runs in the
    loader worker. Files that are not JPEGs (no SOI) go to PIL, which decodes PNGs and
    fails what it cannot read with its own reason."""
    try:
        with open(path, "rb") as f:
            data = bytearray(f.read())
    except OSError:
        return Routed("host", "unreadable")  # PIL gives the reason
    if data[:2] != b"\xff\xd8":
        return Routed("host", "not a JPEG")
    try:
        stream = inspect_jpeg(data)
    except DamagedJpeg as e:
        return Routed("failed", str(e))
    why = host_only(stream)
    if why is not None:
        return Routed("host", why)
    return Routed("device", None, torch.frombuffer(data, dtype=torch.uint8),
                  (stream.height, stream.width))


def check_decoder(device: torch.device) -> None:
    """Decode one tiny JPEG on ``device`` before the run, so that a torchvision built
    without nvJPEG fails the run with one line instead of every row with a reason."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 8), (200, 40, 90)).save(buf, "JPEG")
    data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
    try:
        out = torchvision.io.decode_jpeg([data], mode=torchvision.io.ImageReadMode.RGB,
                                         device=device)
    except Exception as e:
        raise ConfigError(f"data.decode=device: torchvision {torchvision.__version__} cannot "
                          f"decode JPEGs on {device} ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); use data.decode=cpu"
                          ) from e
    if tuple(out[0].shape) != (3, 8, 16):
        raise ConfigError(f"data.decode=device: the decoder on {device} returned shape "
                          f"{tuple(out[0].shape)} for an 8x16 JPEG; use data.decode=cpu")


def _reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:250] or type(e).__name__


def size_groups(boxes: list[tuple[float, ...]], shapes: list[tuple[int, int]]
                ) -> dict[tuple[tuple[int, int], tuple[int, int, int, int]], list[int]]:
    """Positions grouped by (decoded height and width, crop box in whole pixels): the images
    of a group crop to one shape and share one interpolation."""
    groups: dict[tuple[tuple[int, int], tuple[int, int, int, int]], list[int]] = {}
    for i, (box, shape) in enumerate(zip(boxes, shapes, strict=True)):
        y0, x0, y1, x1 = (int(round(v)) for v in box)
        groups.setdefault((shape, (y0, x0, y1, x1)), []).append(i)
    return groups


def decode_into(batch: dict[str, Any], pixels: torch.Tensor, image_size: int) -> dict[int, str]:
    """Decode the batch's JPEG bytes on ``pixels.device`` (nvJPEG on a GPU, libjpeg-turbo on
    the CPU) into their rows of ``pixels``, each cropped to its box and resized with
    antialiasing as PIL does; one interpolation per group of equal decoded size and box.

    Returns:
        Position in the batch -> reason, for the JPEGs that do not decode.
    """
    todo = [i for i, data in enumerate(batch["jpeg"]) if data is not None]
    if not todo:
        return {}
    device = pixels.device
    mode = torchvision.io.ImageReadMode.RGB
    try:
        images: list[torch.Tensor | str] = list(torchvision.io.decode_jpeg(
            [batch["jpeg"][i] for i in todo], mode=mode, device=device))
    except RuntimeError:  # one bad stream fails the whole call: decode one by one to find it
        images = []
        for i in todo:
            try:
                images.append(torchvision.io.decode_jpeg(batch["jpeg"][i], mode=mode,
                                                         device=device))
            except RuntimeError as e:
                images.append(_reason(e))
    errors = {i: im for i, im in zip(todo, images, strict=True) if isinstance(im, str)}
    good = [(i, im) for i, im in zip(todo, images, strict=True) if not isinstance(im, str)]
    boxes = [tuple(batch["box"][i].tolist()) for i, _ in good]
    shapes = [(im.shape[1], im.shape[2]) for _, im in good]
    for (_, (y0, x0, y1, x1)), members in size_groups(boxes, shapes).items():
        crops = torch.stack([good[m][1][:, y0:y1, x0:x1] for m in members])
        resized = torch.nn.functional.interpolate(
            crops.float(), size=(image_size, image_size), mode="bilinear", antialias=True,
            align_corners=False)
        rows = torch.tensor([good[m][0] for m in members], device=device)
        pixels.index_copy_(0, rows, resized.round_().clamp_(0, 255).to(torch.uint8))
    return errors


def batch_pixels(batch: dict[str, Any], device: torch.device, image_size: int) -> torch.Tensor:
    """The batch's uint8 pixels (N, 3, S, S) on ``device``: host-decoded rows copied from
    the (pinned) batch, JPEG rows decoded there; rows that failed stay zero. The reasons of
    JPEGs that fail to decode go into ``batch["error"]``."""
    n, host = len(batch["index"]), batch["host"]
    if len(host) == n:  # decode=cpu, or no JPEG went to the device: one copy as before
        return batch["pixels"].to(device, non_blocking=True)
    x = torch.zeros((n, 3, image_size, image_size), dtype=torch.uint8, device=device)
    if len(host):
        x.index_copy_(0, host.to(device, non_blocking=True),
                      batch["pixels"].to(device, non_blocking=True))
    for pos, reason in decode_into(batch, x, image_size).items():
        batch["error"][pos] = reason
    return x


def decode_ahead(loader: Iterable[dict[str, Any]], device: torch.device, image_size: int
                 ) -> Iterator[tuple[dict[str, Any], torch.Tensor]]:
    """(batch, pixels on ``device``) for each batch of ``loader``, one batch ahead.

    Batch i+1 is fetched and its copy, decode and resize are queued before batch i is
    handed out; on CUDA they run on a side stream, so they overlap the model's work on
    batch i (which waits only for its own batch's event). On the CPU the order is the same
    and the work simply happens in turn.
    """
    side = torch.cuda.Stream(device) if device.type == "cuda" else None

    def start(batch: dict[str, Any]) -> tuple[dict[str, Any], torch.Tensor, Any]:
        if side is None:
            return batch, batch_pixels(batch, device, image_size), None
        with torch.cuda.stream(side):
            x = batch_pixels(batch, device, image_size)
            ready = torch.cuda.Event()
            ready.record(side)
        return batch, x, ready

    def finish(batch: dict[str, Any], x: torch.Tensor, ready: Any
               ) -> tuple[dict[str, Any], torch.Tensor]:
        if ready is not None:
            main = torch.cuda.current_stream(device)
            main.wait_event(ready)
            x.record_stream(main)  # x was made on the side stream; main uses it now
        return batch, x

    pending = None
    for batch in loader:
        queued = start(batch)
        if pending is not None:
            yield finish(*pending)
        pending = queued
    if pending is not None:
        yield finish(*pending)
