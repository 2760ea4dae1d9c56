"""timm models and token layouts: detected per layer, stored in the file, and the CAMs equal a
Grad-CAM computed by hand with the explicit reshape of each family."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import timm
import torch
from conftest import TINY, compose_cfg, write_images
from torch import nn

from pipeline.cli import run
from pipeline.data import ImageDataset, build_records, collate
from pipeline.errors import ConfigError, StoreError
from pipeline.layouts import Layout, detect, detect_layouts, layer_reshape
from pipeline.methods import GradCAM
from pipeline.models import build_model, resolve_layers
from pipeline.results import load_run
from pipeline.runtime import Normalize
from pipeline.store import attr_list

pytestmark = pytest.mark.usefixtures("one_thread")

VIT = "{img_size:32,patch_size:8,depth:2,num_classes:10}"
SWIN = "{img_size:32,window_size:2,depths:[1,1],num_heads:[1,2],embed_dim:16,num_classes:10}"


def tokens_to_map(prefix: int, h: int, w: int):
    """The explicit reshape a user would write: drop prefix tokens, rows of w patches."""
    def reshape(t: torch.Tensor) -> torch.Tensor:
        return t[:, prefix:, :].reshape(t.shape[0], h, w, t.shape[2]).permute(0, 3, 1, 2)
    return reshape


def nhwc_to_map(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 3, 1, 2)


def hand_gradcam(model: nn.Module, module: nn.Module, x: torch.Tensor, classes: torch.Tensor,
                 to_map) -> tuple[torch.Tensor, float]:
    """Grad-CAM by hand: hook the layer, explicit reshape, alpha = mean grad, ReLU(sum).

    Also returns the largest sum_c |alpha_c A_c|: float32 rounding of the channel sum
    (another summation order) is a few 1e-7 of it, whatever the cancellation leaves."""
    kept: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda m, a, out: kept.append(out))
    try:
        logits = model(x.clone().requires_grad_())
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(logits.gather(1, classes[:, None]).sum(), kept[0])
    a, g = to_map(kept[0].detach()), to_map(grad)
    terms = g.mean(dim=(2, 3))[:, :, None, None] * a
    return torch.relu(terms.sum(1)), float(terms.abs().sum(1).max())


def stored_vs_hand(run_dir: Path, cfg, hand_maps: dict[str, object]) -> dict[str, dict]:
    """The run's stored CAMs against hand Grad-CAMs of the same pixels and classes."""
    torch.manual_seed(cfg.seed)  # the run's random-init weights
    model, info = build_model(cfg.model)
    records = build_records(cfg.data)
    size = cfg.data.image_size
    batch = collate([ImageDataset(records, np.arange(len(records)), size, "square")[i]
                     for i in range(len(records))])
    x = Normalize(info.mean, info.std)(batch["pixels"])
    with load_run(run_dir) as stored:
        classes = torch.from_numpy(stored.targets[0].astype(np.int64))
        modules = dict(model.named_modules())
        for layer, to_map in hand_maps.items():
            cam = stored.cams(layer)
            ref, scale = hand_gradcam(model, modules[layer], x, classes, to_map)
            assert cam.shape == ref.shape
            assert ref.max() > 1e-3 * scale  # a test of numbers, not of zeros
            np.testing.assert_allclose(cam, ref.numpy(), rtol=0, atol=1e-6 * scale)
        return stored.layouts


def timm_run(tmp_path: Path, name: str, layers: str, kwargs: str, size: int, *extra: str):
    write_images(tmp_path / "img", 3)
    cfg = compose_cfg(*TINY, "model=timm", f"model.name={name}", "model.weights=null",
                      f"model.target_layers={layers}", f"+model.kwargs={kwargs}",
                      "data=glob", f"data.pattern={tmp_path}/img/*.jpg",
                      f"data.image_size={size}", "channels_last=false", *extra)
    run(cfg, tmp_path / "run")
    return cfg


def test_timm_vit_tokens_detected_and_cam_equals_hand_reshape(tmp_path):
    cfg = timm_run(tmp_path, "vit_tiny_patch16_224", "[blocks.1.norm1]", VIT, 32,
                   "stage=all")  # render too: the stored token maps are ordinary maps
    layouts = stored_vs_hand(tmp_path / "run", cfg, {"blocks.1.norm1": tokens_to_map(1, 4, 4)})
    assert layouts == {"blocks.1.norm1": {
        "layout": "tokens", "text": "tokens(prefix=1, grid=4x4)", "shape": [17, 192],
        "channels": 192, "grid": [4, 4], "prefix": 1, "source": "auto"}}
    with load_run(tmp_path / "run") as stored:
        assert attr_list(stored.attrs["mean"]) == [0.5, 0.5, 0.5]  # timm's config of this ViT
        assert stored.config["model"]["reshape"] is None
    assert len(list((tmp_path / "run" / "pictures").rglob("*.png"))) >= 3


def test_evaluate_rebuilds_a_timm_token_model_and_its_layouts(tmp_path):
    """The sanity check recomputes the stored maps on the re-loaded model: a ViT's tokens
    must be read as at extraction, with no reshape key in the stored config."""
    cfg = timm_run(tmp_path, "vit_tiny_patch16_224", "[blocks.1.norm1]", VIT, 32,
                   "stage=extract")
    options = ("stage=evaluate", f"run_dir={tmp_path / 'run'}", "evaluate.metrics=[sanity]",
               "evaluate.sanity_max_steps=2")
    # model=timm names the stored model._target_ (timm.create_model) on this command line.
    result = run(compose_cfg(*TINY, "model=timm", *options), tmp_path / "run")
    assert result["evaluated"] == 3
    with h5py.File(result["metrics"], "r") as m:
        rho = m["gradcam/blocks.1.norm1/sanity_spearman"][:]
    # Rank correlations of the recomputed maps (NaN where a map is constant, as documented).
    assert rho.shape == (3, 2) and np.isfinite(rho).sum() >= 4
    assert cfg.model.reshape is None


def test_timm_deit_distilled_drops_both_prefix_tokens(tmp_path):
    cfg = timm_run(tmp_path, "deit_tiny_distilled_patch16_224", "[blocks.1.norm1]", VIT, 32,
                   "stage=extract")
    layouts = stored_vs_hand(tmp_path / "run", cfg, {"blocks.1.norm1": tokens_to_map(2, 4, 4)})
    assert layouts["blocks.1.norm1"]["text"] == "tokens(prefix=2, grid=4x4)"
    assert layouts["blocks.1.norm1"]["shape"] == [18, 192]  # class + distillation + 16


def test_timm_swin_channels_last_detected(tmp_path):
    cfg = timm_run(tmp_path, "swin_tiny_patch4_window7_224", "[layers.0,layers.1]", SWIN, 32,
                   "stage=extract")
    layouts = stored_vs_hand(tmp_path / "run", cfg,
                             {"layers.0": nhwc_to_map, "layers.1": nhwc_to_map})
    assert {k: v["text"] for k, v in layouts.items()} == {
        "layers.0": "nhwc(grid=8x8)", "layers.1": "nhwc(grid=4x4)"}
    with h5py.File(tmp_path / "run" / "results.h5", "r+") as f:  # plain h5py reads it too
        assert '"nhwc(grid=4x4)"' in f.attrs["layer_layouts"]
        f.attrs["layer_layouts"] = '{"layers.0": '  # damaged
    with load_run(tmp_path / "run") as stored, pytest.raises(
            StoreError, match="results.h5 is damaged: layer_layouts is not JSON"):
        _ = stored.layouts


def test_timm_convnext_nchw_stage_and_nhwc_block_norm_in_one_run(tmp_path):
    # conv_mlp=False: inside a block the LayerNorm and MLP run channels last.
    cfg = timm_run(tmp_path, "convnext_atto", "[stages.3,stages.3.blocks.1.norm]",
                   "{num_classes:10,conv_mlp:false}", 64, "stage=extract")
    layouts = stored_vs_hand(tmp_path / "run", cfg,
                             {"stages.3": lambda t: t, "stages.3.blocks.1.norm": nhwc_to_map})
    assert {k: (v["text"], v["shape"]) for k, v in layouts.items()} == {
        "stages.3": ("nchw(grid=2x2)", [320, 2, 2]),
        "stages.3.blocks.1.norm": ("nhwc(grid=2x2)", [2, 2, 320])}


def test_timm_cnn_end_to_end_with_model_mean_override(tmp_path):
    cfg = timm_run(tmp_path, "resnet10t", "[layer4]", "{num_classes:10}", 64, "stage=extract",
                   "model.mean=[0.1,0.2,0.3]")
    layouts = stored_vs_hand(tmp_path / "run", cfg, {"layer4": lambda t: t})
    assert layouts["layer4"]["text"] == "nchw(grid=2x2)"
    with load_run(tmp_path / "run") as stored:
        assert attr_list(stored.attrs["mean"]) == pytest.approx([0.1, 0.2, 0.3])
        assert attr_list(stored.attrs["std"]) == pytest.approx([0.229, 0.224, 0.225])


def _head_init(model: nn.Module) -> nn.Module:
    # torchvision zero-initializes the ViT head: every gradient would be 0, every CAM empty.
    nn.init.normal_(model.heads.head.weight)
    return model


def test_torchvision_shipped_vit_b_16_and_swin_t_need_no_reshape_key():
    # swin_t at 64: a 2x2 last map (at 1x1 the LayerNorm after it makes every CAM 0).
    for name, layer, size, expected, to_map in (
            ("vit_b_16", "encoder.layers.encoder_layer_11.ln_1", 32,
             "tokens(prefix=1, grid=2x2)", tokens_to_map(1, 2, 2)),
            ("swin_t", "features", 64, "nhwc(grid=2x2)", nhwc_to_map)):
        cfg = compose_cfg(f"model={name}", "model.weights=null",
                          *(["+model.kwargs.image_size=32"] if name == "vit_b_16" else []))
        assert cfg.model.reshape is None and list(cfg.model.target_layers) == [layer]
        torch.manual_seed(0)
        model, _ = build_model(cfg.model)
        if name == "vit_b_16":
            _head_init(model)
        layers = resolve_layers(model, [layer])
        reshape, layouts = layer_reshape(model, layers, (size, size), cfg.model.reshape)
        assert layouts[layer].describe() == expected
        x = torch.randn(2, 3, size, size)
        with GradCAM(model, layers, reshape=reshape) as m:
            cam = m(x, lambda logits: torch.tensor([3, 7]))[f"gradcam/{layer}"]
        ref, scale = hand_gradcam(model, layers[layer], x, torch.tensor([3, 7]), to_map)
        assert ref.max() > 1e-3 * scale
        torch.testing.assert_close(cam, ref, rtol=0, atol=1e-6 * scale)


def test_non_square_grid_and_another_input_size_of_the_run():
    torch.manual_seed(1)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=(32, 48), patch_size=8, depth=1,
                            num_classes=10, dynamic_img_size=True).eval().requires_grad_(False)
    layers = resolve_layers(vit, ["blocks.0.norm1"])
    reshape, layouts = layer_reshape(vit, layers, (32, 48))
    assert layouts["blocks.0.norm1"] == Layout("tokens", (25, 192), 192, (4, 6), prefix=1)
    classes = torch.tensor([1, 2])
    # A batch of the probe's size, then one of another (native resolution): 40x24 -> 5x3.
    for h, w in ((32, 48), (40, 24)):
        x = torch.randn(2, 3, h, w)
        with GradCAM(vit, layers, reshape=reshape) as m:
            cam = m(x, lambda logits: classes)["gradcam/blocks.0.norm1"]
        ref, scale = hand_gradcam(vit, layers["blocks.0.norm1"], x, classes,
                                  tokens_to_map(1, h // 8, w // 8))
        assert cam.shape == (2, h // 8, w // 8) and ref.max() > 1e-3 * scale
        torch.testing.assert_close(cam, ref, rtol=0, atol=1e-6 * scale)


def test_prefix_tokens_without_word_from_the_model_and_overrides():
    class Tokens(nn.Module):
        """(N, 2 + 3*5, C) tokens from a module that says nothing about prefix tokens."""

        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Conv2d(3, 4, 8, 8)
            self.norm = nn.LayerNorm(4)
            self.head = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            t = self.embed(x).flatten(2).transpose(1, 2)
            t = torch.cat([t[:, :2] * 0, t], 1)
            return self.head(self.norm(t).mean(1))

    model = Tokens().eval()
    layers = resolve_layers(model, ["norm", "embed"])
    got = detect_layouts(model, layers, (24, 40))
    assert got["norm"].describe() == "tokens(prefix=2, grid=3x5)"
    assert got["embed"].describe() == "nchw(grid=3x5)"
    none = detect_layouts(model, layers, (24, 40), "none")
    assert [v.kind for v in none.values()] == ["none", "nchw"]
    assert layer_reshape(model, {"embed": model.embed}, (24, 40))[0] is None  # nothing to do
    with pytest.raises(ConfigError, match=r"model.reshape=nhwc: layer 'norm' outputs \(17, 4\)"):
        detect_layouts(model, {"norm": model.norm}, (24, 40), "nhwc")
    with pytest.raises(ConfigError, match="unknown model.reshape 'vitt'; did you mean 'vit'"):
        detect_layouts(model, layers, (24, 40), "vitt")
    # 1001..993 tokens have no factor pair within a 32x32 input: used as they are (say,
    # stored activations), unless forced.
    assert detect("x", nn.Identity(), model, (1001, 4), (32, 32)).kind == "none"
    with pytest.raises(ConfigError, match="model.reshape=vit: layer 'x' outputs 1001 tokens"):
        detect("x", nn.Identity(), model, (1001, 4), (32, 32), "vit")


def test_explicit_reshape_overrides_are_config_choices(tmp_path):
    write_images(tmp_path / "img", 2)
    base = (*TINY, "model=timm", "model.name=vit_tiny_patch16_224", "model.weights=null",
            f"+model.kwargs={VIT}", "data=glob", f"data.pattern={tmp_path}/img/*.jpg",
            "data.image_size=32", "stage=extract", "model.target_layers=[blocks.1.norm1]")
    run(compose_cfg(*base, "model.reshape=vit"), tmp_path / "vit")
    with load_run(tmp_path / "vit") as stored:
        assert stored.layouts["blocks.1.norm1"]["source"] == "model.reshape=vit"
        assert stored.cams("blocks.1.norm1").shape == (2, 4, 4)
    # Activations of a token layer: the detected map (prefix dropped), or raw with none.
    run(compose_cfg(*base, "method=activations", "method.dtype=float32"), tmp_path / "act")
    run(compose_cfg(*base, "method=activations", "method.dtype=float32", "model.reshape=none"),
        tmp_path / "raw")
    with load_run(tmp_path / "act") as act, load_run(tmp_path / "raw") as raw:
        tokens = raw.activations("blocks.1.norm1")
        assert tokens.shape == (2, 17, 192) and raw.layouts["blocks.1.norm1"]["layout"] == "none"
        expected = tokens_to_map(1, 4, 4)(torch.from_numpy(tokens)).numpy()
        np.testing.assert_array_equal(act.activations("blocks.1.norm1"), expected)
    with pytest.raises(ConfigError, match=r"outputs shape \(1, 17, 192\), not"):
        run(compose_cfg(*base, "model.reshape=none"), tmp_path / "none")
    with pytest.raises(ConfigError, match="unknown model.reshape 'swim'; did you mean 'swin'"):
        run(compose_cfg(*base, "model.reshape=swim"), tmp_path / "bad")


def test_fixed_size_vit_at_another_image_size_is_one_line(tmp_path):
    write_images(tmp_path / "img", 1)
    cfg = compose_cfg(*TINY, "model=timm", "model.name=vit_tiny_patch16_224",
                      "model.weights=null", "data=glob", f"data.pattern={tmp_path}/img/*.jpg",
                      "data.image_size=64", "model.target_layers=[blocks.11.norm1]")
    with pytest.raises(ConfigError, match=r"takes 224x224 inputs only, data.image_size is 64: "
                                          r"set data.image_size=224 or \+model.kwargs.img_size=64"):
        run(cfg, tmp_path / "run")
    tv = compose_cfg(*TINY, "model=vit_b_16", "model.weights=null", "data=glob",
                     f"data.pattern={tmp_path}/img/*.jpg", "data.image_size=64")
    with pytest.raises(ConfigError, match=r"takes 224x224 inputs only, data.image_size is 64: "
                                          r"set data.image_size=224 or \+model.kwargs.image_s"):
        run(tv, tmp_path / "tv")


def test_unknown_timm_model_names_the_closest():
    cfg = compose_cfg("model=timm", "model.name=convnext_tinyy", "model.weights=null")
    with pytest.raises(ConfigError, match="unknown timm model 'convnext_tinyy'; did you mean "
                                          "'convnext_tiny'"):
        build_model(cfg.model)
    cfg = compose_cfg("model=timm", "model.name=convnext_tiny.fb_in1kk", "model.weights=null")
    with pytest.raises(ConfigError, match="unknown pretrained tag of timm model 'convnext_tiny' "
                                          "'convnext_tiny.fb_in1kk'; did you mean "
                                          "'convnext_tiny.fb_in1k'"):
        build_model(cfg.model)


def test_missing_timm_says_which_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    cfg = compose_cfg("model=timm", "model.weights=null")
    with pytest.raises(ConfigError, match=r"pip install camsweep\[timm\]"):
        build_model(cfg.model)


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """An empty Hugging Face hub cache (test_convnext's weights live on the hub)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path / "hf"


def test_offline_uncached_weights_fail_at_once(empty_caches, monkeypatch):
    from huggingface_hub import constants

    # A port nobody listens on: the connection is refused at once, deterministically.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{s.getsockname()[1]}")
        cfg = compose_cfg("model=timm", "model.name=test_convnext")
        with pytest.raises(ConfigError) as e:
            build_model(cfg.model)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("timm weights of 'test_convnext' (timm/test_convnext.r160_in1k) are "
                          f"not cached in {empty_caches} and 127.0.0.1 cannot be reached")
    assert msg.endswith("pre-download them (timm.create_model('test_convnext', pretrained=True) "
                        "with network), pass a checkpoint with model.weights=/path/to/file, or "
                        "use model.weights=null for random init")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match="and HF_HUB_OFFLINE is set: pre-download"):
        build_model(cfg.model)


def test_cached_weights_and_checkpoints_load_without_network(empty_caches, monkeypatch, tmp_path):
    from huggingface_hub import constants
    from safetensors.torch import save_file

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # any request would fail
    torch.manual_seed(5)
    trained = timm.create_model("test_convnext")
    state = {k: v.contiguous() for k, v in trained.state_dict().items()}
    # The hub cache's layout: refs/main names the snapshot holding the files.
    repo = empty_caches / "models--timm--test_convnext.r160_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    save_file(state, str(repo / "snapshots" / "abc123" / "model.safetensors"))
    model, info = build_model(compose_cfg("model=timm", "model.name=test_convnext").model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert info.mean == (0.5, 0.5, 0.5)  # test_convnext's own, as timm's config says
    # A local checkpoint (torch.save, weights_only load) for any timm architecture.
    torch.save({"state_dict": state}, tmp_path / "ckpt.pth")
    model, _ = build_model(compose_cfg("model=timm", "model.name=test_convnext",
                                       f"model.weights={tmp_path / 'ckpt.pth'}").model)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
