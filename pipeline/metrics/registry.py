"""The metric registry: each metric declared once, as the method registry declares methods.

A :class:`MetricSpec` says what a metric is: its options (a :class:`MetricOptions`
dataclass, keys of the ``evaluate`` config), its outputs (:class:`OutputSpec`: name,
per-image axes, dtype, description), its axes' coordinates (:class:`Dim`), its summary
figures (:class:`Figure`: label, which direction is better, format) and where its compute
function lives (``"module:function"``, imported only when evaluating). From these come
the ``evaluate`` config schema (:func:`evaluate_schema`), the layout of ``metrics.h5``
(:func:`layout`), the checks of a file read back, the per-map means
(:func:`pipeline.store.metrics.summarize`) and the columns tables and reports show
(:func:`per_map_columns`, :func:`figures`).

This module imports no torch: read-only stages (report, table, explore) use it. The
built-in metrics are declared in :mod:`pipeline.metrics.declared`, imported at the end;
adding a metric is its compute module plus one :func:`register` call there (or in any
module imported before the config is composed).

A compute function is called as ``compute(ctx, batch) -> {path: tensor}`` once per batch
(``ctx``: :class:`pipeline.metrics.batch.Evaluation`, ``batch``:
:class:`pipeline.metrics.batch.MetricBatch`), returning ``"<map>/<output>"`` for per-map
outputs and ``"<output>"`` for per-image ones, each with the batch's items first. An
optional ``prepare(ctx) -> str | None`` runs once before the loop; a string is the reason
the metric is skipped for this run.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import MISSING, dataclass, field, fields, is_dataclass, make_dataclass
from importlib import import_module
from typing import Any, get_type_hints

from ..errors import ConfigError, unknown
from ..options import Options, option  # noqa: F401  (option: part of this API)

DIRECTIONS = ("higher", "lower", "zero")  # which way a figure is better ("zero": closer to 0)
_NAME = re.compile(r"[a-z][a-z0-9_]*")


# -- options ----------------------------------------------------------------------------------

@dataclass
class MetricOptions(Options):
    """A metric's options: keys of the ``evaluate`` config group. Options several metrics
    share (``steps``) are declared alike by each and appear once in the config."""

    GROUP = "evaluate"


# -- declarations -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Dim:
    """A per-image axis of an output, with its coordinate computed from the settings."""

    name: str
    description: str
    coords: Callable[[dict[str, Any]], Sequence[Any]]


@dataclass(frozen=True)
class OutputSpec:
    """One dataset a metric writes: per map (``<map>/<name>``) or per image (``<name>`` at
    the file's root). ``dims`` are the axes after the image axis (and, for target=topk runs,
    the class axis). ``description`` may name ``{score}`` (the metrics' score) and
    ``{confidence}`` (Average Drop's)."""

    name: str
    description: str
    dims: tuple[str, ...] = ()
    dtype: str = "float32"
    per_map: bool = True
    per_item: bool = True  # False: one per image even where target=topk explains k classes
    metric: str = ""  # filled by register
    since: int = 1  # the metrics-file version that first has it (older files lack it)

    def describe(self, settings: dict[str, Any]) -> str:
        return self.description.format(score=score_name(settings.get("score", "logit")),
                                       confidence=score_name(settings.get("confidence_score",
                                                                          "prob")))


@dataclass(frozen=True)
class Figure:
    """A summary figure of one map: ``reduce`` (``mean``, or ``last``: the mean of the
    output's last entry along its axis) over the evaluated images, times ``scale``."""

    key: str  # the name in MapSummary.figures and report tables
    output: str
    label: str
    direction: str  # one of DIRECTIONS
    format: str = "{:.3f}"
    unit: str = ""  # "%" after the number
    scale: float = 1.0
    reduce: str = "mean"
    help: str = ""

    def text(self, value: float) -> str:
        return f"{self.label} {self.format.format(value)}{self.unit}"


@dataclass(frozen=True)
class MetricSpec:
    name: str
    description: str
    compute: str  # "module:function"
    Options: type[MetricOptions] = MetricOptions
    outputs: tuple[OutputSpec, ...] = ()
    dims: tuple[Dim, ...] = ()
    figures: tuple[Figure, ...] = ()
    prepare: str | None = None  # "module:function"

    def function(self, which: str = "compute") -> Callable[..., Any]:
        """The compute (or prepare) function, imported now (it may import torch)."""
        module, _, name = str(getattr(self, which)).partition(":")
        return getattr(import_module(module), name)


METRICS: dict[str, MetricSpec] = {}  # config name -> declaration, in the order computed


def register(spec: MetricSpec) -> MetricSpec:
    """Add ``spec`` to :data:`METRICS` after checking it: a new lower-case name, options as
    a :class:`MetricOptions` dataclass whose shared keys agree with other metrics', outputs
    whose names are new and whose dims are declared, figures of its own outputs."""
    if not _NAME.fullmatch(spec.name) or spec.name in METRICS:
        raise TypeError(f"metric name {spec.name!r} is not a new lower-case identifier")
    if not (is_dataclass(spec.Options) and issubclass(spec.Options, MetricOptions)):
        raise TypeError(f"{spec.name}: Options must be a MetricOptions dataclass")
    taken = {o.name: o.metric for m in METRICS.values() for o in m.outputs}
    known = {d.name for m in (*METRICS.values(), spec) for d in m.dims}
    for out in spec.outputs:
        if out.name in taken or out.name in ("score", "status", "image"):
            raise TypeError(f"{spec.name}: output {out.name!r} is taken "
                            f"({taken.get(out.name, 'the file')})")
        missing = [d for d in out.dims if d not in known]
        if missing:
            raise TypeError(f"{spec.name}: output {out.name!r} has undeclared dims {missing}")
    names = {o.name for o in spec.outputs}
    for fig in spec.figures:
        if fig.output not in names or fig.direction not in DIRECTIONS:
            raise TypeError(f"{spec.name}: figure {fig.key!r} needs one of its outputs and a "
                            f"direction in {DIRECTIONS}")
    shared = _option_fields()
    for f in fields(spec.Options):
        if f.name in shared and _default(shared[f.name]) != _default(f):
            raise TypeError(f"{spec.name}: option {f.name!r} is declared with another default "
                            "by another metric")
    outputs = tuple(OutputSpec(**{**o.__dict__, "metric": spec.name}) for o in spec.outputs)
    spec = MetricSpec(**{**spec.__dict__, "outputs": outputs})
    METRICS[spec.name] = spec
    return spec


def _default(f: Any) -> Any:
    return f.default_factory() if f.default is MISSING else f.default


def _option_fields() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for spec in METRICS.values():
        for f in fields(spec.Options):
            out.setdefault(f.name, f)
    return out


# -- what is derived ----------------------------------------------------------------------------

def score_name(score: str) -> str:
    return {"prob": "softmax probability", "logprob": "log-softmax probability",
            "sigmoid": "sigmoid probability"}.get(score, "logit")


# Per-image outputs every metrics file has, whatever the metrics.
SCORE = OutputSpec("score", "target class {score} of the re-loaded image (check of the "
                            "reproduction: compare /targets/score)", per_map=False, metric="")


def outputs(metrics: Iterable[str] | None = None, per_map: bool | None = None) -> list[
        OutputSpec]:
    """Declared outputs of ``metrics`` (default: every registered one), in order."""
    chosen = [METRICS[m] for m in (METRICS if metrics is None else metrics)]
    found = [SCORE, *(o for spec in chosen for o in spec.outputs)]
    return [o for o in found if per_map is None or o.per_map == per_map]


def per_map_columns(metrics: Iterable[str] | None = None) -> list[OutputSpec]:
    """The per-map outputs with one value per image (and class): the metric columns of a
    per-image table, same names as in metrics.h5 (``deletion_auc``, ``drop``, ...)."""
    return [o for o in outputs(metrics, per_map=True) if not o.dims]


def figures(metrics: Iterable[str] | None = None) -> list[Figure]:
    """The summary figures of ``metrics`` (default: all), in order."""
    chosen = [METRICS[m] for m in (METRICS if metrics is None else metrics)]
    return [fig for spec in chosen for fig in spec.figures]


def dims(metrics: Iterable[str] | None = None) -> dict[str, Dim]:
    chosen = [METRICS[m] for m in (METRICS if metrics is None else metrics)]
    return {d.name: d for spec in chosen for d in spec.dims}


# Dataset path -> (per-image shape, dims, description, dtype).
Layout = dict[str, tuple[tuple[int, ...], list[str], str, str]]


def coordinates(settings: dict[str, Any], metrics: Iterable[str], classes: int = 0) -> dict[
        str, list[Any]]:
    """Each axis name of a layout -> its coordinate values (``image`` excluded)."""
    metrics = list(metrics)
    out = {name: list(d.coords(settings)) for name, d in dims(metrics).items()}
    if classes:
        out["class"] = list(range(classes))  # the rank of the class explained
    return out


def layout(settings: dict[str, Any], maps: Sequence[str], metrics: Iterable[str],
           classes: int = 0) -> Layout:
    """Every dataset the metrics file holds for these settings, maps and metrics:
    ``score`` and the per-image outputs at the root, ``<map>/<output>`` per map.
    ``classes`` > 0 (a target=topk run) puts a class axis after the image axis."""
    metrics = list(metrics)
    coords = coordinates(settings, metrics, classes)
    lead = ["image", "class"] if classes else ["image"]
    out: Layout = {}
    for o in outputs(metrics):
        shape = tuple(len(coords[d]) for d in o.dims)
        item = classes and o.per_item
        entry = ((classes, *shape) if item else shape, (lead if item else ["image"]) + list(o.dims),
                 o.describe(settings), o.dtype)
        for key in ([f"{m}/{o.name}" for m in maps] if o.per_map else [o.name]):
            out[key] = entry
    return out


# -- the evaluate config ------------------------------------------------------------------------

@dataclass
class EvaluateOptions:
    """The ``evaluate`` keys that belong to no one metric."""

    metrics: list[str] = field(default_factory=list)  # filled with every registered metric
    maps: list[str] | None = None  # stored maps to score, e.g. [gradcam/layer4]; null: all
    # null: the run's target.score (what its maps explain) | logit | prob | logprob | sigmoid
    score: str | None = None
    batch_points: int = 64  # perturbed inputs per forward pass (bounds memory)
    limit: int | None = None  # evaluate only the first k done images
    seed: int = 0  # randomized weights and ROAD noise
    overwrite: bool = False  # replace an existing metrics.h5 without asking


def evaluate_schema() -> type:
    """The ``evaluate`` config schema: :class:`EvaluateOptions` plus every registered
    metric's options (``pipeline.config.EvaluateConfig``)."""
    hints = get_type_hints(EvaluateOptions)
    specs: list[tuple[str, Any, Any]] = []
    for f in fields(EvaluateOptions):
        default = (field(default_factory=lambda: list(METRICS)) if f.name == "metrics"
                   else field(default=f.default) if f.default is not MISSING
                   else field(default_factory=f.default_factory))
        specs.append((f.name, hints[f.name], default))
    for name, f in _option_fields().items():
        owner = next(s.Options for s in METRICS.values()
                     if name in {g.name for g in fields(s.Options)})
        default = (field(default=f.default) if f.default is not MISSING
                   else field(default_factory=f.default_factory))
        specs.append((name, get_type_hints(owner)[name], default))
    schema = make_dataclass("EvaluateConfig", specs)
    schema.__module__ = "pipeline.config"
    schema.__doc__ = "stage=evaluate: metrics of the stored maps (pipeline/metrics/declared.py)."
    return schema


def check_options(ev: Any) -> None:
    """One-line errors for bad ``evaluate.*`` values of the chosen metrics (and unknown
    metric names), before any work."""
    for name in ev.metrics:
        if name not in METRICS:
            raise ConfigError(unknown("evaluate metric", name, METRICS))
    if ev.batch_points < 1:
        raise ConfigError(f"evaluate.batch_points must be >= 1, got {ev.batch_points}")
    for name in ev.metrics:
        opts = METRICS[name].Options
        opts(**{f.name: ev[f.name] for f in fields(opts)}).check()


from . import declared as _declared  # noqa: E402,F401  (the built-in metrics register)
