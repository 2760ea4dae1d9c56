"""Datasets: ImageNet val layouts, globs, shards, decoding of odd images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import photo, write_images
from omegaconf import OmegaConf
from PIL import Image

from pipeline.data import (
    ImageDataset,
    build_records,
    collate,
    shard_of,
    shard_range,
)
from pipeline.device_decode import batch_pixels
from pipeline.errors import ConfigError, DataError
from pipeline.images import input_box, open_image

WNIDS = ["n01440764", "n01443537", "n01484850"]  # tench, goldfish, great white shark


def data_cfg(**kw):
    base = {"name": "imagenet_val", "pattern": None, "root": None, "labels": None,
            "synsets": None, "limit": None, "shard": None, "num_shards": None}
    return OmegaConf.create({**base, **kw})


def synsets(path, wnids):
    path.write_text("".join(f"{w} some name, other name\n" for w in wnids))


def test_class_folders_with_synset_mapping(tmp_path):
    root = tmp_path / "val"
    for i, w in enumerate(WNIDS[::-1]):  # folder order must not matter
        write_images(root / w, 2, start=10 * i)
    synsets(tmp_path / "LOC_synset_mapping.txt", ["n00000000", *WNIDS])  # beside the root
    recs = build_records(data_cfg(root=str(root)))
    assert [(r.path.split("/")[-2], r.label) for r in recs] == [
        ("n01440764", 1), ("n01440764", 1), ("n01443537", 2), ("n01443537", 2),
        ("n01484850", 3), ("n01484850", 3)]


def test_class_folders_without_mapping_need_all_classes(tmp_path):
    root = tmp_path / "val"
    for w in WNIDS:
        write_images(root / w, 1)
    with pytest.raises(DataError, match="names 3 of the 1000 classes.*data.synsets"):
        build_records(data_cfg(root=str(root)))
    # Numbered folders are class indices as they are.
    root2 = tmp_path / "val2"
    write_images(root2 / "281", 1)
    write_images(root2 / "7", 1)
    assert sorted(r.label for r in build_records(data_cfg(root=str(root2)))) == [7, 281]


def test_flat_folder_with_loc_val_solution(tmp_path):
    root = tmp_path / "val"
    write_images(root, 3)
    (root / "img000.jpg").rename(root / "ILSVRC2012_val_00000001.JPEG")
    (root / "img001.jpg").rename(root / "ILSVRC2012_val_00000002.JPEG")
    (root / "img002.jpg").rename(root / "ILSVRC2012_val_00000003.JPEG")
    (tmp_path / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\n"
        "ILSVRC2012_val_00000002,n01484850 10 20 30 40 n01484850 1 2 3 4\n"
        "ILSVRC2012_val_00000001,n01443537 5 6 7 8\n")
    synsets(tmp_path / "LOC_synset_mapping.txt", WNIDS)
    recs = build_records(data_cfg(root=str(root)))
    assert [r.label for r in recs] == [1, 2, -1]  # third image has no row: unknown


def test_flat_folder_with_labels_file(tmp_path):
    root = tmp_path / "val"
    write_images(root, 3)
    (tmp_path / "labels.txt").write_text("img002.jpg 5\nimg000.jpg 3\n")
    recs = build_records(data_cfg(root=str(root), labels=str(tmp_path / "labels.txt")))
    assert [r.label for r in recs] == [3, -1, 5]
    (tmp_path / "plain.txt").write_text("9\n8\n7\n")  # one label per line, sorted files
    recs = build_records(data_cfg(root=str(root), labels=str(tmp_path / "plain.txt")))
    assert [r.label for r in recs] == [9, 8, 7]


def test_flat_folder_without_labels_is_an_error(tmp_path):
    write_images(tmp_path / "val", 2)
    with pytest.raises(DataError, match="flat folder without labels"):
        build_records(data_cfg(root=str(tmp_path / "val")))


def test_glob_is_recursive_sorted_and_limited(tmp_path):
    write_images(tmp_path / "a" / "b", 2)
    write_images(tmp_path / "a", 1, start=5)
    recs = build_records(data_cfg(name="glob", pattern=f"{tmp_path}/**/*.jpg", limit=2))
    assert [r.path.removeprefix(str(tmp_path)) for r in recs] == ["/a/b/img000.jpg",
                                                                  "/a/b/img001.jpg"]


@pytest.mark.parametrize(("n", "k"), [(10, 3), (7, 2), (2, 3), (50_000, 16)])
def test_shards_tile_the_dataset(n, k):
    ranges = [shard_range(n, i, k) for i in range(k)]
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    sizes = [b - a for a, b in ranges]
    assert max(sizes) - min(sizes) <= 1


def test_shard_from_config_and_slurm(monkeypatch, caplog):
    for key in ("SLURM_NTASKS", "SLURM_PROCID", "SLURM_STEP_ID", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(key, raising=False)
    assert shard_of(data_cfg(shard=1, num_shards=3)) == (1, 3)
    assert shard_of(data_cfg()) == (0, 1)
    # A batch script of `sbatch -n 4` (no srun) is one process: it does all the work, and
    # says how to shard, instead of silently doing a quarter of it.
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert shard_of(data_cfg()) == (0, 1)
    assert "not an srun task" in caplog.text
    with pytest.raises(ConfigError, match="needs data.shard=0..3 \\(or srun"):
        shard_of(data_cfg(num_shards=4))
    # Task 2 of an srun step of 4 tasks.
    monkeypatch.setenv("SLURM_PROCID", "2")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    assert shard_of(data_cfg()) == (2, 4)
    assert shard_of(data_cfg(num_shards=4)) == (2, 4)


def test_decoding_odd_images(tmp_path):
    Image.fromarray(photo(1)).convert("CMYK").save(tmp_path / "cmyk.jpg")
    im, size = open_image(str(tmp_path / "cmyk.jpg"))
    assert im.mode == "RGB" and size == (80, 96)
    assert np.abs(np.asarray(im, dtype=int) - photo(1)).mean() < 8  # same picture
    deep = (photo(2)[..., 1].astype(np.uint16) * 257)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    im, _ = open_image(str(tmp_path / "deep.png"))
    np.testing.assert_array_equal(np.asarray(im)[..., 0], photo(2)[..., 1])  # scaled, not clipped
    # EXIF orientation 6 (rotate 90 cw): the upright image is returned, size swapped.
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(photo(3)).save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    im, size = open_image(str(tmp_path / "rot.jpg"))
    assert im.size == (80, 96) and size == (96, 80)


def test_draft_decoding_of_big_jpegs_matches_full_decoding(tmp_path):
    big = np.kron(photo(4, 100, 150), np.ones((8, 8, 1), np.uint8))  # 800x1200
    Image.fromarray(big).save(tmp_path / "big.jpg", quality=95)
    recs = build_records(data_cfg(name="glob", pattern=f"{tmp_path}/*.jpg"))
    item = ImageDataset(recs, np.arange(1), 64, "square")[0]
    full = Image.open(tmp_path / "big.jpg").convert("RGB").resize((64, 64), Image.BILINEAR)
    diff = np.abs(item["pixels"].permute(1, 2, 0).numpy().astype(int) - np.asarray(full))
    assert diff.mean() < 3 and item["size"].tolist() == [800, 1200]


def test_center_crop_is_never_upsampled_from_a_coarser_draft(tmp_path):
    """A 1920x960 JPEG at 224, center_crop: the draft decode (here 1/2: 960x480) must keep
    the crop (0.875 of the shorter side) at >= 224 pixels. A draft at the size asked for
    the whole image (1/4: 480x240) crops 210 pixels and upsamples them."""
    wide = np.kron(photo(5, 60, 120), np.ones((16, 16, 1), np.uint8))  # 960x1920
    rng = np.random.default_rng(0)
    wide = np.clip(wide.astype(int) + rng.integers(-40, 41, wide.shape), 0, 255).astype(np.uint8)
    Image.fromarray(wide).save(tmp_path / "wide.jpg", quality=95)
    recs = build_records(data_cfg(name="glob", pattern=f"{tmp_path}/*.jpg"))
    item = ImageDataset(recs, np.arange(1), 224, "center_crop")[0]
    y0, x0, y1, x1 = item["box"].tolist()
    full = Image.open(tmp_path / "wide.jpg").convert("RGB").resize(
        (224, 224), Image.BILINEAR, box=(x0, y0, x1, y1))
    diff = np.abs(item["pixels"].permute(1, 2, 0).numpy().astype(int) - np.asarray(full))
    assert item["size"].tolist() == [960, 1920] and diff.mean() < 1.5, diff.mean()


def test_input_boxes():
    assert input_box((300, 400), 224, "square") == (0, 0, 300, 400)
    y0, x0, y1, x1 = input_box((300, 400), 224, "center_crop")
    assert (y1 - y0, x1 - x0) == (262.5, 262.5) and (y0 + y1) / 2 == 150 and (x0 + x1) / 2 == 200


CUDA = pytest.mark.skipif(not torch.cuda.is_available(),
                          reason="CUDA TESTS NOT RUN: no CUDA GPU on this machine")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, CUDA])])
@pytest.mark.parametrize("resize", ["square", "center_crop"])
@pytest.mark.parametrize("size", [64, 224])
def test_decode_on_device_gives_the_pixels_of_cpu_decoding(tmp_path, resize, size, device):
    """data.decode=device (torchvision's decoder, crop and antialiased resize on the
    device: nvJPEG on a GPU, libjpeg-turbo on the CPU) against PIL in the workers, pixel by
    pixel.

    Measured on the CPU: mean |diff| <= 0.4 grey levels per image, max 8 where the crop box
    is rounded to whole pixels; up to 25 on a few pixels of big photos, which PIL decodes
    DCT-reduced (draft mode) and the device decodes whole."""
    write_images(tmp_path, 3)
    write_images(tmp_path, 2, size=(300, 200), start=10)
    write_images(tmp_path, 2, size=(97, 131), start=20)
    write_images(tmp_path, 2, size=(900, 1300), start=30)  # draft-decoded on the CPU
    Image.fromarray(photo(40)[..., 0]).save(tmp_path / "gray.jpg")
    recs = build_records(data_cfg(name="glob", pattern=f"{tmp_path}/*.jpg"))
    rows = np.arange(len(recs))
    cpu = collate([ImageDataset(recs, rows, size, resize)[i] for i in rows])
    dev = collate([ImageDataset(recs, rows, size, resize, decode="device")[i] for i in rows])
    assert all(j is not None for j in dev["jpeg"])  # every file took the device path
    assert dev["pixels"] is None and len(dev["host"]) == 0  # no pixels shipped: bytes only
    pixels = batch_pixels(dev, torch.device(device), size).cpu()
    assert dev["error"] == [""] * len(rows)
    assert torch.equal(dev["size"], cpu["size"]) and torch.equal(dev["box"], cpu["box"])
    assert cpu["pixels"].float().std() > 20  # real pictures, not blank ones that agree
    diff = (pixels.int() - cpu["pixels"].int()).abs().float()
    assert diff.mean(dim=(1, 2, 3)).max() <= 1.5
    assert diff.max() <= 32
