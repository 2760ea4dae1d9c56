"""data.decode=device without a GPU: stream checks, routing, batching by size, one batch
ahead, and the one-line error of a device without a JPEG decoder. The decoder itself runs
here on the CPU (libjpeg-turbo through torchvision); tests/test_cuda.py runs it on nvJPEG."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torchvision
from conftest import TINY, compose_cfg, photo
from PIL import Image

from pipeline import device_decode
from pipeline.data import ImageDataset, Record, collate
from pipeline.device_decode import (
    DamagedJpeg,
    batch_pixels,
    check_decoder,
    decode_ahead,
    decode_into,
    host_only,
    inspect_jpeg,
    route,
    size_groups,
)
from pipeline.errors import ConfigError
from pipeline.extract import extract
from pipeline.results import load_run


def jpeg(array: np.ndarray, **save: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "JPEG", **save)
    return buf.getvalue()


def rotated(array: np.ndarray, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return jpeg(array, exif=exif.tobytes())


BASELINE = jpeg(photo(1, 24, 40))
PROGRESSIVE = jpeg(photo(2, 24, 40), progressive=True)
GRAY = jpeg(photo(3, 24, 40)[..., 0])


def test_sound_streams_are_read_from_their_headers():
    s = inspect_jpeg(BASELINE)
    assert (s.frame, s.precision, s.height, s.width, s.components, s.scans) == (
        0xC0, 8, 24, 40, 3, 1)
    assert host_only(s) is None
    g = inspect_jpeg(GRAY)
    assert (g.frame, g.components, g.scans, host_only(g)) == (0xC0, 1, 1, None)
    p = inspect_jpeg(PROGRESSIVE)
    assert (p.frame, p.height, p.width, p.components) == (0xC2, 24, 40, 3)
    assert p.scans > 1  # libjpeg writes ten scans for a progressive YCbCr picture
    assert host_only(p) == "progressive JPEG (SOF2)"
    buf = io.BytesIO()
    Image.fromarray(photo(4, 24, 40)).convert("CMYK").save(buf, "JPEG")
    c = inspect_jpeg(buf.getvalue())
    assert (c.components, host_only(c)) == (4, "4 colour components (CMYK/YCCK)")
    r = inspect_jpeg(rotated(photo(5, 24, 40), 6))
    assert (r.orientation, host_only(r)) == (6, "EXIF orientation 6 (rotated or mirrored)")
    assert host_only(inspect_jpeg(rotated(photo(5, 24, 40), 1))) is None
    # Bytes after EOI are ignored, as every decoder ignores them.
    assert inspect_jpeg(BASELINE + b"trailing junk") == s


@pytest.mark.parametrize("name", ["baseline", "progressive", "gray"])
def test_every_truncation_of_a_jpeg_is_damaged(name):
    """Cut after any number of bytes, from 0 to all but the last, the stream fails: the
    last byte is EOI's second one."""
    data = {"baseline": BASELINE, "progressive": PROGRESSIVE, "gray": GRAY}[name]
    reasons = set()
    for cut in range(len(data)):
        with pytest.raises(DamagedJpeg) as err:
            inspect_jpeg(data[:cut])
        reasons.add(str(err.value).split(":")[1].split(" at ")[0].split("(")[0].strip())
    assert inspect_jpeg(data).width == 40
    assert {"empty file", "no SOI marker", "no EOI marker",
            "file ends inside the image data"} <= reasons


def test_broken_structures_are_damaged_with_a_reason():
    n = len(BASELINE)
    sos = BASELINE.index(b"\xff\xda")
    dqt = BASELINE.index(b"\xff\xdb")
    cases = {
        # A segment length pointing past the end of the file.
        "segment 0xFFDB at byte": BASELINE[:dqt + 2] + b"\xff\xf0" + BASELINE[dqt + 4:],
        # EOI straight after the scan header: a scan without image data.
        "has no image data": BASELINE[:sos + 14] + b"\xff\xd9",
        # The frame header removed: a scan with nothing to describe its picture.
        "before the frame header": _without(BASELINE, 0xC0),
        "no quantization table": _without(BASELINE, 0xDB),
        "unexpected marker 0xFFD8": BASELINE[:sos] + b"\xff\xd8" + BASELINE[sos:],
        "file ends inside the image data": BASELINE[:n - 2] + b"\xff",
        "no EOI marker": BASELINE[:sos],  # headers only
    }
    for expected, data in cases.items():
        with pytest.raises(DamagedJpeg, match=expected):
            inspect_jpeg(data)


def _without(data: bytes, marker: int) -> bytes:
    """``data`` with every segment of ``marker`` cut out (headers only, before the scan)."""
    out, pos = bytearray(data[:2]), 2
    while data[pos + 1] != 0xDA:
        length = data[pos + 2] << 8 | data[pos + 3]
        if data[pos + 1] != marker:
            out += data[pos:pos + 2 + length]
        pos += 2 + length
    return bytes(out + data[pos:])


def test_extraneous_bytes_send_the_file_to_pil():
    sos = BASELINE.index(b"\xff\xda")
    s = inspect_jpeg(BASELINE[:sos] + b"\x00\x17" + BASELINE[sos:])
    assert s.extraneous and host_only(s) == "extraneous bytes between segments"


@pytest.fixture
def mixed(tmp_path):
    """Every route: device (baseline colour and grey), PIL (progressive, CMYK, rotated,
    PNG), failed (truncated, zero bytes, text) -- in this name order."""
    d = tmp_path / "mixed"
    d.mkdir()
    files = {
        "a_base.jpg": jpeg(photo(10)), "b_gray.jpg": jpeg(photo(11)[..., 0]),
        "c_prog.jpg": jpeg(photo(12), progressive=True),
        "d_prog_gray.jpg": jpeg(photo(13)[..., 0], progressive=True),
        "e_rot.jpg": rotated(photo(14), 6), "g_trunc.jpg": jpeg(photo(15))[:700],
        "h_empty.jpg": b"", "i_text.jpg": b"not an image\n",
        "j_big.jpg": jpeg(photo(16, 120, 90)),
    }
    for name, data in files.items():
        (d / name).write_bytes(data)
    Image.fromarray(photo(17)).convert("CMYK").save(d / "f_cmyk.jpg")
    Image.fromarray(photo(18)).save(d / "k_png.jpg", "PNG")
    return d


def test_route_sends_each_file_its_way(mixed):
    where = {p.name: route(str(p)) for p in sorted(mixed.iterdir())}
    assert {k: v.where for k, v in where.items()} == {
        "a_base.jpg": "device", "b_gray.jpg": "device", "c_prog.jpg": "host",
        "d_prog_gray.jpg": "host", "e_rot.jpg": "host", "f_cmyk.jpg": "host",
        "g_trunc.jpg": "failed", "h_empty.jpg": "host", "i_text.jpg": "host",
        "j_big.jpg": "device", "k_png.jpg": "host"}
    assert bytes(where["a_base.jpg"].data.numpy()) == (mixed / "a_base.jpg").read_bytes()
    assert where["j_big.jpg"].size == (120, 90)
    assert where["g_trunc.jpg"].why.startswith("damaged JPEG: file ends inside the image data")
    assert where["c_prog.jpg"].why == "progressive JPEG (SOF2)"


def test_device_batches_equal_cpu_batches_row_by_row(mixed):
    """decode=device through collate and batch_pixels against decode=cpu: rows decoded by
    PIL in the worker are the same pixels; JPEG rows come from the device decoder (equal
    up to the resampler's rounding, see test_data.py); failed rows are zero with reasons."""
    recs = [Record(str(p)) for p in sorted(mixed.iterdir())]
    rows = np.arange(len(recs))
    items = [ImageDataset(recs, rows, 32, "center_crop", decode="device")[i] for i in rows]
    assert [it["pixels"] is None for it in items] == [
        True, True, False, False, False, False, False, False, False, True, False]
    dev = collate(items)
    cpu = collate([ImageDataset(recs, rows, 32, "center_crop")[i] for i in rows])
    assert dev["host"].tolist() == [2, 3, 4, 5, 6, 7, 8, 10]
    assert dev["pixels"].shape == (8, 3, 32, 32)  # no placeholder for the 3 device rows
    x = batch_pixels(dev, torch.device("cpu"), 32)
    assert x.shape == (11, 3, 32, 32)
    host = dev["host"].tolist()
    assert torch.equal(x[host], cpu["pixels"][host])
    for i in (0, 1, 9):
        diff = (x[i].int() - cpu["pixels"][i].int()).abs().float()
        assert diff.mean() < 1.5 and cpu["pixels"][i].float().std() > 10
    assert dev["error"][6].startswith("damaged JPEG: file ends inside the image data")
    assert not x[6].any() and not x[7].any() and not x[8].any()
    assert [bool(e) for e in dev["error"]] == [bool(e) for e in cpu["error"]]
    assert torch.equal(dev["size"], cpu["size"]) and torch.equal(dev["box"], cpu["box"])


def test_size_groups():
    boxes = [(0, 0, 10, 20), (0, 0, 10, 20), (0.4, 0, 10.2, 20), (0, 0, 10, 20), (1, 0, 11, 20)]
    shapes = [(10, 20), (10, 20), (10, 20), (12, 20), (12, 20)]
    assert size_groups(boxes, shapes) == {((10, 20), (0, 0, 10, 20)): [0, 1, 2],
                                          ((12, 20), (0, 0, 10, 20)): [3],
                                          ((12, 20), (1, 0, 11, 20)): [4]}


def test_grouped_resize_equals_one_resize_per_image():
    """One interpolation per size group gives the pixels of one per image, exactly."""
    sizes = [(40, 60), (40, 60), (33, 47), (40, 60), (33, 47)]
    data = [torch.frombuffer(bytearray(jpeg(photo(20 + i, h, w))), dtype=torch.uint8)
            for i, (h, w) in enumerate(sizes)]
    boxes = torch.tensor([[0, 5, 40, 55], [0, 5, 40, 55], [2, 0, 31, 47], [0, 5, 40, 55],
                          [2, 0, 31, 47]], dtype=torch.float32)
    batch = {"jpeg": [*data[:2], None, *data[2:]],
             "box": torch.cat([boxes[:2], torch.zeros(1, 4), boxes[2:]])}
    pixels = torch.zeros(6, 3, 16, 16, dtype=torch.uint8)
    assert decode_into(batch, pixels, 16) == {}
    assert not pixels[2].any()  # the row without bytes is left alone
    for pos, i in zip([0, 1, 3, 4, 5], range(5), strict=True):
        image = torchvision.io.decode_jpeg(data[i], mode=torchvision.io.ImageReadMode.RGB)
        y0, x0, y1, x1 = (int(v) for v in boxes[i])
        one = torch.nn.functional.interpolate(
            image[None, :, y0:y1, x0:x1].float(), size=(16, 16), mode="bilinear",
            antialias=True, align_corners=False)[0].round().clamp(0, 255).to(torch.uint8)
        assert torch.equal(pixels[pos], one)
        assert one.float().std() > 5


def test_a_stream_the_decoder_rejects_fails_alone(monkeypatch):
    """The batched call raises for one bad stream; the others still decode."""
    good = torch.frombuffer(bytearray(BASELINE), dtype=torch.uint8)
    bad = torch.frombuffer(bytearray(b"\xff\xd8garbage"), dtype=torch.uint8)
    batch = {"jpeg": [good, bad, good], "box": torch.tensor([[0, 0, 24, 40]] * 3).float()}
    pixels = torch.zeros(3, 3, 8, 8, dtype=torch.uint8)
    errors = decode_into(batch, pixels, 8)
    assert list(errors) == [1] and errors[1].startswith("RuntimeError")
    assert pixels[0].any() and torch.equal(pixels[0], pixels[2]) and not pixels[1].any()


def test_decode_ahead_prepares_the_next_batch_first(mixed):
    """Batch i is handed out only after batch i+1 was fetched and decoded, and every batch
    comes with its own pixels, in order."""
    recs = [Record(str(p)) for p in sorted(mixed.iterdir())]
    dataset = ImageDataset(recs, np.arange(len(recs)), 16, "square", decode="device")
    fetched = []

    def loader():
        for start in range(0, len(recs), 3):
            fetched.append(start)
            yield collate([dataset[i] for i in range(start, min(start + 3, len(recs)))])

    seen = []
    for batch, x in decode_ahead(loader(), torch.device("cpu"), 16):
        first = int(batch["index"][0])
        seen.append(first)
        assert fetched[-1] == min(first + 3, 9)  # the next batch is already out
        again = collate([dataset[int(i)] for i in batch["index"]])
        assert torch.equal(x, batch_pixels(again, torch.device("cpu"), 16))
    assert seen == [0, 3, 6, 9]


def test_a_device_without_a_jpeg_decoder_is_one_line(monkeypatch, tmp_path, image_dir):
    check_decoder(torch.device("cpu"))  # torchvision decodes on the CPU: nothing to say

    def no_decoder(*args, **kwargs):
        raise RuntimeError("Not compiled with GPU support\nmore lines")

    monkeypatch.setattr(device_decode.torchvision.io, "decode_jpeg", no_decoder)
    with pytest.raises(ConfigError) as err:
        extract(compose_cfg(*TINY, "data=glob", f"data.pattern={image_dir}/*.jpg",
                            "data.decode=device"), tmp_path / "run")
    assert str(err.value) == (
        f"data.decode=device: torchvision {torchvision.__version__} cannot decode JPEGs on "
        "cpu (RuntimeError: Not compiled with GPU support); use data.decode=cpu")
    assert not (tmp_path / "run" / "results.h5").exists()


def test_extract_with_device_decoding_fails_damaged_rows(tmp_path, mixed):
    """End to end on the mixed folder: the same rows done and failed as decode=cpu, the
    truncated JPEG with the stream check's reason."""
    base = (*TINY, "data=glob", f"data.pattern={mixed}/*", "method=activations",
            "method.dtype=float32", "model.target_layers=[conv1]")
    cpu = extract(compose_cfg(*base), tmp_path / "cpu")
    dev = extract(compose_cfg(*base, "data.decode=device"), tmp_path / "dev")
    assert (dev.done, dev.failed) == (cpu.done, cpu.failed) == (8, 3)
    with load_run(tmp_path / "dev") as run, load_run(tmp_path / "cpu") as ref:
        assert (run.status == ref.status).all()
        errors = dict(zip([p.rsplit("/", 1)[1] for p in run.paths], run.errors, strict=True))
        assert errors["g_trunc.jpg"].startswith("damaged JPEG: file ends inside the image data")
        # Progressive, CMYK, rotated and PNG rows were decoded by PIL, as decode=cpu does.
        same = [i for i, p in enumerate(run.paths) if p.rsplit("/", 1)[1][0] in "cdefk"]
        np.testing.assert_array_equal(run.activations("conv1")[same],
                                      ref.activations("conv1")[same])
