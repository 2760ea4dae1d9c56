"""End to end in-process: configs -> extract -> results file, on tiny models and images."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
import torchvision
from conftest import TINY, compose_cfg

from pipeline.data import ImageDataset, build_records, collate
from pipeline.extract import explain, extract
from pipeline.methods import GradCAM, Saliency, target_fn
from pipeline.models import build_model, resolve_layers
from pipeline.results import load_run
from pipeline.runtime import Normalize, micro_batch_of
from pipeline.store import DONE, FAILED


def test_gradcam_run_matches_direct_method_call(tmp_path, image_dir):
    cfg = compose_cfg(*TINY, "data=glob", f"data.pattern={image_dir}/*.jpg",
                      "model.target_layers=[layer3,layer4]")
    summary = extract(cfg, tmp_path / "run")
    assert (summary.n, summary.done, summary.failed) == (6, 6, 0)

    # Same numbers as calling the method on the same pixels by hand, one image at a time.
    torch.manual_seed(cfg.seed)  # random-init weights are reproducible through `seed`
    model, info = build_model(cfg.model)
    layers = resolve_layers(model, ["layer3", "layer4"])
    records = build_records(cfg.data)
    batch = collate([ImageDataset(records, np.arange(6), 64, "square")[i] for i in range(6)])
    x = Normalize(info.mean, info.std)(batch["pixels"])
    with load_run(tmp_path / "run") as run, GradCAM(model, layers) as m:
        assert run.layers == ["layer3", "layer4"]
        assert (run.status == DONE).all()
        for i in range(6):
            ref = m(x[i:i + 1], target_fn("pred"))
            np.testing.assert_allclose(run.cams("layer4")[i], ref["gradcam/layer4"][0], atol=1e-5)
            np.testing.assert_allclose(run.cams("layer3")[i], ref["gradcam/layer3"][0], atol=1e-5)
            np.testing.assert_allclose(run.weights("layer4")[i], ref["gradcam_weights/layer4"][0],
                                       atol=1e-6)
            assert run.targets[0][i] == ref["targets/class"][0]
        assert run.cams("layer4").shape == (6, 2, 2)
        assert run.cams("layer3").shape == (6, 4, 4)
        cls, prob = run.predictions
        assert cls.shape == (6, 5) and np.all(np.diff(prob, axis=1) <= 0)
        assert (run.sizes == [80, 96]).all()


def test_fixed_target_and_label_target(tmp_path, image_dir):
    cfg = compose_cfg(*TINY, "data=glob", f"data.pattern={image_dir}/*.jpg", "target=class",
                      "target.index=281")
    extract(cfg, tmp_path / "fixed")
    with load_run(tmp_path / "fixed") as run:
        assert (run.targets[0] == 281).all()
    # Glob images carry no label: target=label fails each image with a reason, run goes on.
    cfg = compose_cfg(*TINY, "data=glob", f"data.pattern={image_dir}/*.jpg", "target=label")
    summary = extract(cfg, tmp_path / "label")
    assert summary.failed == 6 and "no label" in summary.errors[0][1]


def test_bad_files_are_recorded_and_the_rest_processed(tmp_path, bad_dir):
    cfg = compose_cfg(*TINY, "data=glob", f"data.pattern={bad_dir}/*")
    summary = extract(cfg, tmp_path / "run")
    with load_run(tmp_path / "run") as run:
        status = dict(zip([p.rsplit("/", 1)[-1] for p in run.paths], run.status, strict=True))
        errors = dict(zip([p.rsplit("/", 1)[-1] for p in run.paths], run.errors, strict=True))
    assert {k for k, v in status.items() if v == FAILED} == {"empty.jpg", "text.jpg",
                                                             "truncated.jpg"}
    assert {k for k, v in status.items() if v == DONE} == {
        "img000.jpg", "img001.jpg", "img002.jpg", "gray.png", "cmyk.jpg", "deep.png", "rgba.png"}
    assert "cannot identify image file" in errors["text.jpg"]
    assert "truncated" in errors["truncated.jpg"]
    assert errors["img000.jpg"] == ""
    assert summary.failed == 3 and summary.done == 7
    assert any("failed" in line for line in summary.lines())


def test_saliency_and_activations(tmp_path, image_dir):
    pattern = f"data.pattern={image_dir}/*.jpg"
    extract(compose_cfg(*TINY, "data=glob", pattern, "method=saliency"), tmp_path / "sal")
    with load_run(tmp_path / "sal") as run:
        sal = run.saliency()
        assert sal.shape == (6, 64, 64) and sal.dtype == np.float32 and (sal >= 0).all()
    extract(compose_cfg(*TINY, "data=glob", pattern, "method=activations",
                        "model.target_layers=[type:Conv2d]"), tmp_path / "act")
    with load_run(tmp_path / "act") as run:
        assert len(run.layers) == 20  # every Conv2d of resnet18, in model order
        assert run.layers[0] == "conv1"
        a = run.activations("conv1")
        assert a.shape == (6, 64, 32, 32) and a.dtype == np.float16
    extract(compose_cfg(*TINY, "data=glob", pattern, "method=activations", "method.pool=avg",
                        "method.dtype=float32", "method.max_channels=8"), tmp_path / "pool")
    with load_run(tmp_path / "pool") as run:
        a = run.activations("layer4")
        assert a.shape == (6, 8) and a.dtype == np.float32


def test_activations_equal_forward_outputs(tmp_path, image_dir):
    cfg = compose_cfg(*TINY, "data=glob", f"data.pattern={image_dir}/*.jpg",
                      "method=activations", "method.dtype=float32",
                      "model.target_layers=[layer2.0.bn2]")
    extract(cfg, tmp_path / "act")
    torch.manual_seed(cfg.seed)
    model, info = build_model(cfg.model)
    batch = collate([ImageDataset(build_records(cfg.data), np.arange(6), 64, "square")[i]
                     for i in range(6)])
    x = Normalize(info.mean, info.std)(batch["pixels"])
    head = torch.nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool, model.layer1)
    blk = model.layer2[0]
    with torch.no_grad():
        h = head(x)
        ref = blk.bn2(blk.conv2(blk.relu(blk.bn1(blk.conv1(h)))))  # before `out += identity`
    with load_run(tmp_path / "act") as run:
        np.testing.assert_allclose(run.activations("layer2.0.bn2"), ref.numpy(), atol=1e-5)


def test_plain_h5py_reads_the_file(tmp_path, image_dir):
    cfg = compose_cfg(*TINY, "data=glob", f"data.pattern={image_dir}/*.jpg")
    extract(cfg, tmp_path / "run")
    with h5py.File(tmp_path / "run" / "results.h5", "r") as f:
        assert f.attrs["format"] == "camsweep" and f.attrs["format_version"] == 1
        assert f.attrs["method"] == "gradcam" and f.attrs["model"] == "resnet18"
        for key in ("torch", "torchvision", "h5py", "camsweep"):
            assert key in f.attrs["versions"]
        assert "model:" in f.attrs["config"]
        assert f["images/path"].asstr()[0].endswith("img000.jpg")
        assert f["images/label"].dtype == np.int32 and (f["images/label"][:] == -1).all()
        assert f["images/status"].dtype == np.uint8
        assert f["images/size"].shape == (6, 2)
        assert f["targets/class"].dtype == np.int32 and f["targets/score"].dtype == np.float32
        assert f["predictions/class"].shape == (6, 5)
        cam = f["gradcam/layer4"]
        assert cam.shape == (6, 2, 2) and cam.dtype == np.float32 and cam.chunks[0] >= 1
        assert cam.attrs["layer"] == "layer4" and "image" in cam.attrs["dims"]
        assert f["gradcam_weights/layer4"].shape == (6, 512)
        assert (cam[:] >= 0).all()


def test_label_target_uses_dataset_labels(tmp_path):
    cfg = compose_cfg(*TINY, "data=samples", "target=label")
    summary = extract(cfg, tmp_path / "run")
    # chelsea (285) and coffee (967) have labels; astronaut and rocket do not.
    assert summary.done == 2 and summary.failed == 2
    with load_run(tmp_path / "run") as run:
        assert list(run.targets[0][run.done]) == [285, 967]


@pytest.mark.parametrize("resize", ["square", "center_crop"])
def test_input_box_is_stored(tmp_path, image_dir, resize):
    cfg = compose_cfg(*TINY, "data=glob", f"data.pattern={image_dir}/*.jpg",
                      f"data.resize={resize}")
    extract(cfg, tmp_path / "run")
    with h5py.File(tmp_path / "run" / "results.h5") as f:
        box = f["images/box"][0]
    if resize == "square":
        np.testing.assert_allclose(box, [0, 0, 80, 96])
    else:  # 0.875 of the shorter side, centered
        np.testing.assert_allclose(box, [5, 13, 75, 83])


def test_lite0_explains_the_cat():
    """The embedded pretrained model on a bundled photo: right class, heat on the cat."""
    from pipeline.data import SAMPLES_DIR
    from pipeline.images import open_image

    cfg = compose_cfg()
    model, info = build_model(cfg.model)
    im, _ = open_image(str(SAMPLES_DIR / "chelsea.jpg"))
    x = torch.from_numpy(np.array(im.resize((224, 224)))).permute(2, 0, 1)[None]
    x = Normalize(info.mean, info.std)(x)
    layers = resolve_layers(model, cfg.model.target_layers)
    with GradCAM(model, layers) as m:
        out = m(x, target_fn("pred"))
    assert int(out["predictions/class"][0, 0]) == 285  # Egyptian cat
    assert info.categories[285] == "Egyptian cat"
    cam = out["gradcam/features"][0].numpy()  # 7x7 over the 451x300 photo
    # The cat fills x < ~380 of 451 px (columns 0..5 of 7); the right strip is background.
    assert cam[:, :6].sum() / cam.sum() > 0.9
    peak = np.unravel_index(cam.argmax(), cam.shape)
    assert 1 <= peak[1] <= 5  # peak on the face, not at the border


def test_torchvision_model_classes():
    m = torchvision.models.resnet18()
    assert sum(isinstance(x, torch.nn.Conv2d) for x in m.modules()) == 20


def test_topk_target_stores_a_map_per_class(tmp_path, image_dir):
    pattern = f"data.pattern={image_dir}/*.jpg"
    extract(compose_cfg(*TINY, "data=glob", pattern, "target=topk", "target.k=3"), tmp_path / "k")
    with load_run(tmp_path / "k") as run:
        cams, (cls, _) = run.cams("layer4"), run.predictions
        tcls, tscore = run.targets
        assert cams.shape == (6, 3, 2, 2) and tcls.shape == (6, 3) and tscore.shape == (6, 3)
        np.testing.assert_array_equal(tcls, cls[:, :3])  # the k best classes, best first
        assert (np.diff(tscore, axis=1) <= 0).all()
        t = run.table(stats=False)  # a row per image and explained class
        assert (t["target"] == tcls.ravel()).all() and (t["rank"] == [0, 1, 2] * 6).all()
        done = cams.copy()
    # Each class's map equals a run that explains that class alone.
    for k in range(3):
        cls_k = int(tcls[0, k])
        extract(compose_cfg(*TINY, "data=glob", pattern, "target=class", f"target.index={cls_k}",
                            "data.limit=1"), tmp_path / f"c{k}")
        with load_run(tmp_path / f"c{k}") as one:
            np.testing.assert_allclose(one.cams("layer4")[0], done[0, k], rtol=1e-4, atol=1e-6)
    from pipeline.render import render_run

    written = render_run(tmp_path / "k")
    assert len(written) == 6 * 3 and any("layer4-top2" in p.name for p in written)


@pytest.mark.parametrize("target", ["pred", "label", "topk", 7])
def test_micro_batches_give_the_arrays_of_one_pass(target):
    """explain() in passes of 3 images equals one pass of 7, for every kind of target
    (labels are cut with the images; top-k keeps its class axis)."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval().requires_grad_(False)
    x = torch.randn(7, 3, 48, 48)
    labels = torch.arange(7) % 10
    for cls, layers in ((GradCAM, resolve_layers(model, ["layer3", "layer4"])),
                        (Saliency, {})):
        with cls(model, layers) as m:
            whole = explain(m, x, target, labels, 2)
            parts = explain(m, x, target, labels, 2, micro_batch=3)
        assert whole.keys() == parts.keys()
        for key in whole:
            assert parts[key].shape == whole[key].shape, key
            torch.testing.assert_close(parts[key], whole[key], rtol=1e-4, atol=1e-6)
        if target == "label":
            assert torch.equal(whole["targets/class"].long(), labels)


def test_micro_batch_auto_is_8_on_cpu_and_the_batch_on_cuda():
    assert micro_batch_of("auto", torch.device("cpu")) == 8
    assert micro_batch_of("auto", torch.device("cuda")) is None
    assert micro_batch_of(None, torch.device("cpu")) is None
    assert micro_batch_of(3, torch.device("cuda")) == 3


def test_a_layer_without_a_spatial_map_is_one_clear_error(tmp_path):
    """The classifier's output (N, K) is neither a map nor tokens: the error names the layer,
    its shape and what to choose, and no results file is left behind."""
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match=r"layer 'fc' outputs shape \(1, 1000\), not a spatial "
                                          r"map \(N, C, h, w\) nor tokens .*choose a "
                                          r"convolutional or token layer"):
        extract(compose_cfg(*TINY, "model.target_layers=[fc]"), tmp_path)
    assert not (tmp_path / "results.h5").exists()
