"""Configs through Hydra's compose API, and the one-line errors for bad values."""

from __future__ import annotations

import pytest
import torch
from conftest import CONF, TINY, compose_cfg
from hydra.errors import ConfigCompositionException

from pipeline.cli import check_overrides
from pipeline.config import expand_target_shorthand, target_spec, validate
from pipeline.errors import ConfigError, DataError
from pipeline.extract import extract
from pipeline.models import build_model, resolve_layers
from pipeline.results import load_run
from pipeline.runtime import apply_precision, resolve_device

MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))


def test_default_config():
    cfg = compose_cfg()
    validate(cfg)
    assert cfg.model.name == "efficientnet_lite0" and cfg.method.name == "gradcam"
    assert cfg.data.name == "samples" and cfg.device == "auto" and cfg.target.name == "pred"


@pytest.mark.parametrize("method", ["gradcam", "saliency", "activations"])
@pytest.mark.parametrize("data", ["samples", "glob", "imagenet_val"])
def test_every_method_and_data_composes(method, data):
    cfg = compose_cfg(f"method={method}", f"data={data}")
    assert cfg.method.name == method and cfg.data.name == data


@pytest.mark.parametrize("name", MODELS)
def test_every_model_config_builds_and_its_layers_resolve(name):
    cfg = compose_cfg(f"model={name}", "model.weights=null")
    model, info = build_model(cfg.model)
    layers = resolve_layers(model, cfg.model.target_layers)
    assert len(layers) == len(cfg.model.target_layers)
    assert len(info.mean) == 3 and len(info.std) == 3
    assert not any(p.requires_grad for p in model.parameters())
    assert not model.training


def test_misspelled_key_fails_at_compose_time():
    with pytest.raises(ConfigCompositionException):
        compose_cfg("model.target_layer=[layer4]")


@pytest.mark.parametrize(("argv", "message"), [
    (["model=resnet43"], "unknown model 'resnet43'; did you mean 'resnet34'"),
    (["method=gradcm"], "unknown method 'gradcm'; did you mean 'gradcam'"),
    (["data=imagenet"], "unknown data 'imagenet'; did you mean 'imagenet_val'?"),
    (["-m", "model=resnet34,resnet5"], "unknown model 'resnet5'"),
    (["batchsize=3"], "unknown config key 'batchsize'; did you mean 'batch_size'"),
    (["hydra/launcher=slurmm"], "unknown hydra/launcher 'slurmm'"),
    (["target=pre"], "unknown target 'pre'; did you mean 'pred'?"),
    (["target=topk,labl"], "unknown target 'labl'; did you mean 'label'?"),
])
def test_bad_override_is_one_line_with_close_matches(argv, message):
    with pytest.raises(ConfigError) as e:
        check_overrides(argv)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_good_overrides_pass():
    check_overrides(["model=resnet34", "method=saliency", "data.pattern=a/*.jpg", "-m",
                     "model.target_layers=[layer1],[layer2]", "+extra=1", "hydra.verbose=true"])


@pytest.mark.parametrize(("override", "message"), [
    ("precision=fp8", "unknown precision 'fp8'"),
    ("channels_last=fast", "unknown channels_last 'fast'"),
    ("stage=rendr", "unknown stage 'rendr'; did you mean 'render'?"),
    ("target=class", "target=class needs a class index >= 0: target.index=281"),
    ("target=topk target.k=0", "target.k must be >= 1, got 0"),
    ("method=activations target=topk", "target=topk has no effect on method=activations"),
    ("method=activations method.dtype=float8", "unknown method.dtype 'float8'"),
    ("data.resize=crop", "unknown data.resize 'crop'"),
    ("batch_size=0", "batch_size must be auto or an integer >= 1, got 0"),
    ("batch_size=abc", "batch_size must be auto or an integer >= 1, got 'abc'"),
    ("micro_batch=0", "micro_batch must be auto, null or an integer >= 1, got 0"),
    ("micro_batch=some", "micro_batch must be auto, null or an integer >= 1, got 'some'"),
    ("data.shard=2 data.num_shards=2", "data.shard=2 needs data.num_shards > shard"),
])
def test_bad_values_fail_validation(override, message):
    cfg = compose_cfg(*override.split())
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def test_target_group_and_class_shorthand():
    cfg = compose_cfg("target=topk", "target.k=3")
    assert (cfg.target.name, cfg.target.k, target_spec(cfg.target)) == ("topk", 3, "topk")
    argv = expand_target_shorthand(["-m", "target=281,285", "topk=2"])
    assert argv == ["-m", "target=class", "target.index=281,285", "topk=2"]
    assert target_spec(compose_cfg(*expand_target_shorthand(["target=281"])).target) == 281
    assert expand_target_shorthand(["target=label", "model.target_layers=[layer4]"]) == [
        "target=label", "model.target_layers=[layer4]"]
    with pytest.raises(ConfigError, match="not both"):
        expand_target_shorthand(["target=pred,281"])


def test_unknown_layer_names_closest(tmp_path):
    cfg = compose_cfg(*TINY, "model.target_layers=[layer5]")
    with pytest.raises(ConfigError, match="unknown layer 'layer5'; did you mean .*'layer4'"):
        extract(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "results.h5").exists()  # failed before any work


def test_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(ConfigError, match="unknown device 'gpu'; did you mean"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU is available"):
            resolve_device("cuda")


def test_data_errors(tmp_path):
    with pytest.raises(DataError, match="matches no files"):
        extract(compose_cfg(*TINY, "data=glob", f"data.pattern={tmp_path}/*.jpg"), tmp_path)
    with pytest.raises(DataError, match="is not a directory"):
        extract(compose_cfg(*TINY, "data=imagenet_val", f"data.root={tmp_path}/nope"), tmp_path)


def test_offline_default_weights_fail_with_a_fix(tmp_path, monkeypatch):
    """No network: torchvision DEFAULT weights fail in one line that says what to do."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # nothing pre-downloaded

    def no_network(*args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    cfg = compose_cfg("model=resnet34")
    with pytest.raises(ConfigError) as e:
        build_model(cfg.model)
    msg = str(e.value)
    assert "model.weights=null" in msg and "checkpoint" in msg and "\n" not in msg


def test_checkpoint_is_loaded_safely(tmp_path):
    import torchvision

    torch.manual_seed(1)
    ref = torchvision.models.resnet18()
    torch.save({"state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}},
               tmp_path / "ckpt.pth")
    cfg = compose_cfg("model=resnet18", f"model.weights={tmp_path}/ckpt.pth")
    model, _ = build_model(cfg.model)
    torch.testing.assert_close(model.fc.weight, ref.fc.weight)
    # A pickle with code in it is refused by weights_only loading.
    torch.save({"state_dict": ref.state_dict(), "fn": print}, tmp_path / "evil.pth")
    with pytest.raises(ConfigError, match="cannot load checkpoint .* safely"):
        build_model(compose_cfg("model=resnet18", f"model.weights={tmp_path}/evil.pth").model)
    with pytest.raises(ConfigError, match="neither DEFAULT, null, nor an existing"):
        build_model(compose_cfg("model=resnet18", "model.weights=/no/such.pth").model)


def test_custom_target_model(tmp_path, image_dir):
    cfg = compose_cfg("model=custom", "model._target_=torchvision.models.squeezenet1_1",
                      "model.target_layers=[features]", "data.image_size=64", "data=glob",
                      f"data.pattern={image_dir}/*.jpg")
    assert extract(cfg, tmp_path / "run").done == 6


def test_precision_policy_is_explicit_and_stored(tmp_path, image_dir):
    """fp32 is exact IEEE float32 (PyTorch's default lets cuDNN convolutions use TF32);
    tf32 is a choice of its own; the precision is part of the stored run identity."""
    apply_precision("tf32")
    assert torch.backends.cudnn.conv.fp32_precision == "tf32"
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    cfg = compose_cfg(*TINY, "data=glob", f"data.pattern={image_dir}/*.jpg", "data.limit=1")
    extract(cfg, tmp_path / "run")  # precision=fp32: the policy goes back to exact
    assert torch.backends.cudnn.conv.fp32_precision == "ieee"
    assert torch.backends.cuda.matmul.fp32_precision == "ieee"
    with load_run(tmp_path / "run") as run:
        assert '"precision": "fp32"' in run.attrs["fingerprint"]
    validate(compose_cfg("precision=tf32"))
