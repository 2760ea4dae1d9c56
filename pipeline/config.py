"""Typed config schema, registered in Hydra's ConfigStore, and checks of its values.

YAML files in ``conf/<group>/`` start from these schemas through their defaults lists,
so a misspelled key fails when the config is composed, naming the key.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import MISSING as NO_DEFAULT
from dataclasses import dataclass, field, fields, make_dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, get_type_hints

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from . import methods as _methods
from .errors import ConfigError, unknown
from .metrics.registry import evaluate_schema

# stage=<name> -> the function that runs it, "module:function" (see pipeline/stages.py),
# imported only when that stage runs. A new stage is one line here.
STAGES = {
    "all": "pipeline.stages:extract_and_render",
    "extract": "pipeline.stages:extract",
    "render": "pipeline.stages:render",
    "merge": "pipeline.stages:merge",
    "evaluate": "pipeline.stages:evaluate",
    "report": "pipeline.stages:report",
    "table": "pipeline.table:table_stage",
    "explore": "pipeline.explore:explore_stage",
    "status": "pipeline.status:status_stage",
    "verify": "pipeline.verify:verify_stage",
}
DATASETS = ("samples", "glob", "imagenet_val")
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")  # pipeline.runtime says what each means
RESIZES = ("square", "center_crop")
RESHAPES = ("auto", "none", "vit", "nhwc", "swin")  # pipeline.layouts says what each does
TARGET_MODES = ("pred", "label", "topk", "class")


@dataclass
class ModelConfig:
    """Which network to explain and where to look inside it."""

    name: str = MISSING
    # "DEFAULT" (torchvision's pretrained weights), null (random init) or a checkpoint path.
    weights: str | None = "DEFAULT"
    # Module names as ``named_modules()`` spells them; ``features[-1]`` indexes a container;
    # glob patterns (``layer*.*.conv?``) and ``type:Conv2d`` select several.
    target_layers: list[str] = field(default_factory=list)
    # How a layer's output becomes a (C, h, w) map: null/auto (detected per layer from the
    # model and the output's shape) | none (as it is) | vit (tokens) | nhwc / swin.
    reshape: str | None = None
    # Any importable constructor, e.g. ``torchvision.models.resnet18``; kwargs go to it.
    _target_: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    # Input normalization; null takes the model's own.
    mean: list[float] | None = None
    std: list[float] | None = None


@dataclass
class TargetConfig:
    """Which class each map explains (``conf/target/``)."""

    name: str = "pred"  # pred (top-1) | label (dataset label) | topk | class
    k: int = 5  # topk: maps for this many best classes per image
    index: int | None = None  # class: the class index, the same for every image
    # What is explained of that class: logit | prob (softmax) | logprob (log_softmax) |
    # sigmoid (multi-label models; target=class or label). Stored in /targets/score.
    score: str = "logit"


@dataclass
class MethodConfig:
    """Base of every method's schema; the fields come from the method's own declaration."""

    name: str = MISSING


# The generated schema classes by class name; module-level names of this module (see
# __getattr__), so that pickle finds them as it found the hand-written ones: a composed
# config's method node refers to its schema class.
_SCHEMAS: dict[str, type] = {}


def method_schema(spec: _methods.MethodSpec) -> type:
    """The Hydra schema of method ``spec.name`` (``<name>_schema``, which its YAML extends):
    ``name`` plus the fields of ``spec.Options`` with their types and defaults, as a
    dataclass ``pipeline.config.<Name>Config`` (``GradcamConfig``, ``SmoothgradConfig``)."""
    hints = get_type_hints(spec.Options)
    specs: list[tuple[str, Any, Any]] = [("name", str, field(default=spec.name))]
    for f in fields(spec.Options):
        default = (field(default=f.default) if f.default is not NO_DEFAULT
                   else field(default_factory=f.default_factory))
        specs.append((f.name, hints[f.name], default))
    qualname = f"{spec.name.title().replace('_', '')}Config"
    taken = _SCHEMAS.get(qualname)
    if taken is not None and taken().name != spec.name:  # a__b and a_b: one class name
        qualname = f"{spec.name}_Config"
    schema = make_dataclass(qualname, specs, bases=(MethodConfig,))
    schema.__module__ = __name__
    return schema


def _store_method_schema(spec: _methods.MethodSpec) -> None:
    schema = method_schema(spec)
    _SCHEMAS[schema.__qualname__] = schema
    ConfigStore.instance().store(group="method", name=f"{spec.name}_schema", node=schema)


def __getattr__(name: str) -> Any:
    if name == "METHODS":  # the declared names now, so methods registered later count
        return tuple(_methods.SPECS)
    if name in _SCHEMAS:
        return _SCHEMAS[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class DataConfig:
    name: str = MISSING
    pattern: str | None = None  # glob: e.g. photos/**/*.jpg (recursive)
    root: str | None = None  # imagenet_val: class folders, or a flat folder + labels
    labels: str | None = None  # imagenet_val flat: LOC_val_solution.csv or "file label" lines
    synsets: str | None = None  # LOC_synset_mapping.txt: wnid order = class index
    image_size: int = 224
    resize: str | None = "square"  # square | center_crop | null (each image's own size)
    max_side: int | None = None  # resize=null: downscale images whose longest side is longer
    decode: str = "cpu"  # cpu: PIL in DataLoader workers | device: JPEGs on the run's device
    limit: int | None = None  # first k images only
    shard: int | None = None
    num_shards: int | None = None


@dataclass
class RenderConfig:
    image_weight: float = 0.5  # weight of the photo in the blend, as show_cam_on_image
    title: bool = True  # write class name and score onto overlays
    max_images: int | None = None
    grid_channels: int = 64


# stage=evaluate: the general keys and every registered metric's options, from the metric
# registry (pipeline/metrics/registry.py; the metrics in pipeline/metrics/declared.py).
EvaluateConfig = evaluate_schema()


@dataclass
class ReportConfig:
    max_images: int = 24  # images in a run report's gallery (worst, best, per class)


@dataclass
class ExploreConfig:
    """stage=explore: the local web app that browses a run or a sweep (pipeline/explore/)."""

    host: str = "127.0.0.1"  # loopback: only this machine reaches it
    port: int = 8765  # 0: any free port (the URL printed says which)
    open: bool = False  # open the page in a browser


@dataclass
class CamsweepConfig:
    model: ModelConfig = MISSING
    method: Any = MISSING
    data: DataConfig = MISSING
    render: RenderConfig = field(default_factory=RenderConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    explore: ExploreConfig = field(default_factory=ExploreConfig)
    stage: str = "all"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    batch_size: Any = "auto"  # auto (16 on CPU, from free GPU memory on CUDA) | N
    micro_batch: Any = "auto"  # images per model pass: auto (8 on CPU, batch on CUDA) | null | N
    num_workers: int | None = None  # null: chosen from the CPU count and dataset size
    precision: str = "fp32"
    channels_last: Any = "auto"  # NHWC model and inputs: auto (on CPU) | true | false
    compile: bool = False  # torch.compile the model (falls back to eager with a warning)
    target: TargetConfig = MISSING
    topk: int = 5  # predictions (classes, probabilities) stored per image
    run_dir: str | None = None
    overwrite: bool = False
    resume: bool = True
    resume_changed: str = "refuse"  # images changed since their rows were done: refuse | recompute
    merge_copy: bool = False  # stage=merge: copy arrays instead of virtual datasets
    seed: int = 0


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="camsweep_schema", node=CamsweepConfig)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="data", name="data_schema", node=DataConfig)
    cs.store(group="target", name="target_schema", node=TargetConfig)
    # Every declared method's schema, and that of any method declared later.
    _methods.on_declare(_store_method_schema)


def _run_dir(run_dir: str | None, default: str, _root_: Any = None) -> str:
    """``run_dir`` if given; else the unfinished folder of the same command, or a new one
    named ``default`` (Hydra's ``outputs/<date>/<time>``): pipeline.folders."""
    if run_dir:
        return run_dir
    from .folders import claim

    return claim(default, "run", _root_)


def _sweep_dir(default: str, _root_: Any = None) -> str:
    """The unfinished sweep of the same command, or a new ``multirun/<date>/<time>``."""
    from .folders import claim

    return claim(default, "sweep", _root_)


def _output_subdir(stage: str, run_dir: str | None) -> str | None:
    """Where Hydra records the job's config: never over the record of an existing run;
    nowhere for stage=status, which only reads."""
    if stage == "status":
        return None
    if run_dir and (Path(run_dir) / ".hydra" / "config.yaml").exists():
        return f".hydra/{stage}-{datetime.now():%Y%m%d-%H%M%S-%f}"
    return ".hydra"


register_configs()
for _name, _fn in (("camsweep_run_dir", _run_dir), ("camsweep_output_subdir", _output_subdir)):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _fn)
if not OmegaConf.has_resolver("camsweep_sweep_dir"):
    OmegaConf.register_new_resolver("camsweep_sweep_dir", _sweep_dir)


def _choice(kind: str, value: object, valid: Collection[str]) -> None:
    if value not in valid:
        raise ConfigError(unknown(kind, value, valid))


def validate(cfg: DictConfig) -> None:
    """Check enumerated values once, before any work, with one-line errors."""
    _choice("stage", cfg.stage, STAGES)
    method = _methods.method_spec(cfg.method.name)  # one line for an unknown method
    _choice("data", cfg.data.name, DATASETS)
    _choice("precision", cfg.precision, PRECISIONS)
    _choice("resume_changed", cfg.get("resume_changed", "refuse"), ("refuse", "recompute"))
    _choice("data.decode", cfg.data.decode, ("cpu", "device"))
    if cfg.channels_last not in ("auto", True, False):
        raise ConfigError(unknown("channels_last", cfg.channels_last, ("auto", "true", "false")))
    if cfg.data.resize is not None:  # null (native resolution) is valid too: say so
        _choice("data.resize", cfg.data.resize, (*RESIZES, "null"))
    if cfg.model.reshape is not None:
        _choice("model.reshape", cfg.model.reshape, RESHAPES)
    _validate_method(cfg.method)
    target_spec(cfg.target)
    if cfg.target.name == "topk" and method.kind == "activations":
        raise ConfigError(f"target=topk has no effect on method={cfg.method.name} (they do not "
                          f"depend on a class); use target=pred")
    if cfg.num_workers is not None and cfg.num_workers < 0:
        raise ConfigError(f"num_workers must be >= 0 (or null: chosen from the CPUs), got "
                          f"{cfg.num_workers}")
    if cfg.data.image_size < 8:
        raise ConfigError(f"data.image_size must be >= 8 pixels, got {cfg.data.image_size}")
    max_side = cfg.data.get("max_side")
    if max_side is not None:
        if cfg.data.resize is not None:
            raise ConfigError(f"data.max_side={max_side} applies to data.resize=null only "
                              f"(native resolution); got data.resize={cfg.data.resize}")
        if max_side < 8:
            raise ConfigError(f"data.max_side must be >= 8 pixels (or null: no cap), got "
                              f"{max_side}")
    if cfg.data.resize is None and cfg.data.get("decode", "cpu") == "device":
        # The device path decodes a batch of one size; native runs decode on the CPU.
        raise ConfigError("data.decode=device needs data.resize=square or center_crop; "
                          "native resolution (data.resize=null) decodes on the CPU: use "
                          "data.decode=cpu")
    if cfg.data.limit is not None and cfg.data.limit < 1:
        raise ConfigError(f"data.limit must be >= 1 (or null: every image), got "
                          f"{cfg.data.limit}")
    bs = cfg.batch_size
    if bs != "auto" and (isinstance(bs, bool) or not isinstance(bs, int) or bs < 1):
        raise ConfigError(f"batch_size must be auto or an integer >= 1, got {bs!r}")
    mb = cfg.micro_batch
    if mb is not None and mb != "auto" and (isinstance(mb, bool) or not isinstance(mb, int)
                                             or mb < 1):
        raise ConfigError(f"micro_batch must be auto, null or an integer >= 1, got {mb!r}")
    if cfg.topk < 1:
        raise ConfigError(f"topk must be >= 1, got {cfg.topk}")
    if cfg.data.num_shards is not None and cfg.data.num_shards < 1:
        raise ConfigError(f"data.num_shards must be >= 1, got {cfg.data.num_shards}")
    if cfg.data.shard is not None:
        n = cfg.data.num_shards
        if n is None or not 0 <= cfg.data.shard < n:
            raise ConfigError(
                f"data.shard={cfg.data.shard} needs data.num_shards > shard (got {n})"
            )


def target_spec(target: DictConfig) -> str | int:
    """``pred``, ``label``, ``topk`` or the class index of ``target=class``, checked."""
    _choice("target", target.name, TARGET_MODES)
    score = target.get("score", "logit")
    _choice("target.score", score, _methods.SCORES)
    if score == "sigmoid" and target.name in ("pred", "topk"):
        # pred/topk rank the classes as one softmax does; a multi-label model's labels are
        # independent, so which of them to explain is the user's choice.
        raise ConfigError(f"target.score=sigmoid explains one label of a multi-label model; "
                          f"target={target.name} ranks classes as a single-label one: use "
                          f"target=class (target.index=N) or target=label, or target.score="
                          f"logit|prob|logprob")
    if target.name == "topk" and target.k < 1:
        raise ConfigError(f"target.k must be >= 1, got {target.k}")
    if target.name != "class":
        return target.name
    if target.index is None or target.index < 0:
        raise ConfigError(f"target=class needs a class index >= 0: target.index=281 "
                          f"(or short: target=281), got {target.index}")
    return int(target.index)


def expand_target_shorthand(overrides: list[str]) -> list[str]:
    """``target=281`` (or a sweep: ``target=281,285``, ``target=range(281,284)``,
    ``target=choice(281,285)``) -> ``target=class target.index=<the same value>``."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    out = []
    for arg in overrides:
        key, _, value = arg.partition("=")
        if key != "target" or not any(c.isdigit() for c in value):
            out.append(arg)
            continue
        try:
            o = OverridesParser.create().parse_override(arg)
            values = (list(o.sweep_string_iterator()) if o.is_sweep_override()
                      else [o.get_value_string()])
        except Exception as e:  # Hydra's parse errors: one line
            raise ConfigError(f"cannot parse {arg!r}: {str(e).splitlines()[0]}") from e
        if not all(v.strip().isdigit() for v in values):
            raise ConfigError(f"target={value}: sweep either modes (target=pred,label,topk) or "
                              f"class indices (target=281,285), not both")
        out += ["target=class", f"target.index={value}"]
    return out


def _validate_method(method: DictConfig) -> None:
    """The method's options, by the rules its own declaration states (``Options.check``)."""
    options = _methods.method_spec(method.name).Options
    options(**{k: v for k, v in method.items() if k != "name"}).check()


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
