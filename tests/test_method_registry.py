"""Adding a method is its module and its YAML: a toy method defined in this test module
(a Method subclass, its options dataclass, @register) plus a YAML written into a copy of
conf/ runs through compose, validate and extract like a shipped method."""

from __future__ import annotations

import json
import pickle
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import CONF, TINY
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig
from pipeline_inputs import model_and_inputs

import pipeline.config
from pipeline.config import validate
from pipeline.errors import ConfigError
from pipeline.extract import extract
from pipeline.methods import (
    METHODS,
    Batch,
    InputGradient,
    MethodOptions,
    TargetFn,
    build_method,
    option,
    register,
)

# -- the toy method: what a new method's module holds -----------------------------------------


@dataclass
class ScaledInputOptions(MethodOptions):
    scale: float = option(2.0, above=0)  # factor on the map
    channel: str = option("mean", choices=("mean", "red"))  # which input channel(s)


class ScaledInput(InputGradient):
    """Not an explanation: the normalized input (its channel mean, or the red channel)
    times ``scale``, stored as an input map. Needs no gradient."""

    name = "toy_scaled_input"
    needs_grad = False
    Options = ScaledInputOptions
    options: ScaledInputOptions

    def compute(self, x: torch.Tensor, choose: TargetFn) -> Batch:
        _, out = self.forward(x, choose)
        picked = x.mean(dim=1) if self.options.channel == "mean" else x[:, 0]
        out[f"{self.name}/input"] = self.options.scale * picked.float()
        return out


YAML = """\
defaults:
  - toy_scaled_input_schema
scale: 3.0      # the YAML's default wins over the dataclass's, as for every method
channel: mean
"""


@pytest.fixture
def toy_conf(tmp_path: Path) -> Iterator[Path]:
    """Registers the toy method for one test and gives a conf/ with its YAML added."""
    register(ScaledInput)
    try:
        conf = tmp_path / "conf"
        shutil.copytree(CONF, conf)
        (conf / "method" / "toy_scaled_input.yaml").write_text(YAML)
        yield conf
    finally:
        METHODS.pop(ScaledInput.name, None)


def compose_in(conf: Path, *overrides: str) -> DictConfig:
    with initialize_config_dir(str(conf), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_a_registered_method_runs_through_extract(toy_conf, tmp_path):
    assert "toy_scaled_input" in pipeline.config.METHODS  # the registry is the list
    cfg = compose_in(toy_conf, *TINY, "method=toy_scaled_input", "stage=extract",
                     "data.limit=3")
    assert dict(cfg.method) == {"name": "toy_scaled_input", "scale": 3.0, "channel": "mean"}
    validate(cfg)
    summary = extract(cfg, tmp_path / "run")
    assert (summary.done, summary.failed) == (3, 0)

    # The same numbers by hand: extract's preprocessing, the method's formula.
    _, x = model_and_inputs(cfg, 3)
    with h5py.File(summary.path) as f:
        assert f.attrs["method"] == "toy_scaled_input"
        ds = f["toy_scaled_input/input"]
        assert ds.shape == (3, 64, 64) and ds.dtype == np.float32
        # pipeline.store keys the file's description by the method's kind: no entry of its own.
        assert ds.attrs["kind"] == "input_map"
        assert json.loads(ds.attrs["dims"]) == ["image", "height", "width"]
        np.testing.assert_allclose(ds[:], 3.0 * x.mean(dim=1).numpy(), rtol=0, atol=1e-5)
        assert (f["images/status"][:] == 1).all()


def test_a_registered_method_gets_its_options_checked(toy_conf):
    base = (*TINY, "method=toy_scaled_input")
    cfg = compose_in(toy_conf, *base, "method.channel=red", "method.scale=0.5")
    validate(cfg)
    with build_method(cfg.method, torch.nn.Identity(), {}) as m:
        assert (m.options.channel, m.options.scale) == ("red", 0.5)
    with pytest.raises(ConfigError, match="unknown method.channel 'redd'; did you mean 'red'"):
        validate(compose_in(toy_conf, *base, "method.channel=redd"))
    with pytest.raises(ConfigError, match=r"^method.scale must be > 0, got -1.0$"):
        validate(compose_in(toy_conf, *base, "method.scale=-1"))
    with pytest.raises(ConfigCompositionException):  # the schema came from the dataclass
        compose_in(toy_conf, *base, "method.scael=2")
    with pytest.raises(ConfigCompositionException):
        compose_in(toy_conf, *base, "method.scale=big")
    # Called directly, the method checks the same declaration.
    with pytest.raises(ConfigError, match="unknown method.channel 'blue'"):
        ScaledInput(torch.nn.Identity(), {}, channel="blue")


def test_unregistered_method_is_a_one_line_error(toy_conf):
    METHODS.pop(ScaledInput.name)
    cfg = compose_in(toy_conf, *TINY, "method=toy_scaled_input")  # its YAML alone
    with pytest.raises(ConfigError, match="^unknown method 'toy_scaled_input'"):
        validate(cfg)
    assert "toy_scaled_input" not in pipeline.config.METHODS


def test_registration_checks_the_declaration():
    class Nameless(ScaledInput):
        name = "Not A Name"

    class Twice(ScaledInput):
        name = "gradcam"

    class Kindless(ScaledInput):
        name = "toy_kindless"
        kind = "picture"

    @dataclass
    class NamedOptions(MethodOptions):
        name: str = "x"

    class NameOption(ScaledInput):
        name = "toy_name_option"
        Options = NamedOptions

    before = dict(METHODS)
    for cls, message in ((Nameless, "lower-case identifier"), (Twice, "registered already"),
                         (Kindless, "kind must be one of"), (NameOption, "may not declare")):
        with pytest.raises(TypeError, match=message):
            register(cls)
    assert dict(METHODS) == before  # nothing half-registered


def test_composed_method_configs_pickle(toy_conf):
    """A composed config's method node refers to its schema class, generated from the
    declaration: pickle (launchers, worker processes) must find it by name, as it found the
    hand-written classes, in pipeline.config."""
    for name in pipeline.config.METHODS:
        cfg = compose_in(toy_conf, f"method={name}")
        schema = cfg.method._metadata.object_type
        assert schema.__module__ == "pipeline.config"
        assert getattr(pipeline.config, schema.__qualname__) is schema
        assert pickle.loads(pickle.dumps(cfg)) == cfg
    assert pipeline.config.ScaledInputConfig().scale == 2.0  # the dataclass's default
