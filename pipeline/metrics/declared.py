"""The built-in metrics, each declared once: options, outputs, axes, summary figures, and the
compute function (in its family's module, imported only when evaluating). No torch here.

The definitions behind each compute function are in its module's docstrings:
:mod:`.perturbation` (RISE deletion/insertion), :mod:`.confidence` (Grad-CAM++ Average Drop /
Increase in Confidence), :mod:`.road`, :mod:`.pointing`, :mod:`.sanity`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from .registry import Dim, Figure, MetricOptions, MetricSpec, OutputSpec, option, register

BASELINES = ("zero", "mean", "blur")  # what deleted pixels become (perturbation.make_baseline)
ROAD_RULES = ("count", "percentile")  # how many pixels "p %" removes (road.road_masks)
_M = "pipeline.metrics."


@dataclass
class CurveOptions(MetricOptions):
    steps: int = option(50, at_least=1)  # curve points at k/steps of the pixels (RISE: 224)
    blur_sigma: float = option(5.0, above=0)  # the blur baseline: RISE's gkern(11, 5)
    blur_size: int = option(11, at_least=1)

    def check(self) -> None:
        super().check()
        if self.blur_size % 2 == 0:
            raise ConfigError(f"evaluate.blur_sigma must be > 0 and evaluate.blur_size odd, "
                              f"got {self.blur_sigma}, {self.blur_size}")


@dataclass
class DeletionOptions(CurveOptions):
    # zero (normalization mean) | mean (image colour) | blur
    deletion_baseline: str = option("zero", choices=BASELINES)


@dataclass
class InsertionOptions(CurveOptions):
    insertion_baseline: str = option("blur", choices=BASELINES)  # RISE's insertion substrate


@dataclass
class RoadOptions(MetricOptions):
    road_percentiles: list[float] = option([10, 20, 30, 40, 50, 60, 70, 80, 90])  # % removed
    road_noise: float = option(0.01, at_least=0)  # std of imputation noise (normalized units)
    # count: exactly p % of the pixels, ties in raster order | percentile: pytorch-grad-cam's
    road_rule: str = option("count", choices=ROAD_RULES)

    def check(self) -> None:
        super().check()
        bad = [q for q in self.road_percentiles if not 0 < float(q) < 100]
        if bad or not len(self.road_percentiles):
            raise ConfigError(f"evaluate.road_percentiles must be percentages in (0, 100), "
                              f"got {list(self.road_percentiles)}")


@dataclass
class PointingOptions(MetricOptions):
    boxes: str | None = None  # CSV file,xmin,ymin,xmax,ymax; imagenet_val: LOC_val_solution.csv
    tolerance: float = option(15.0, at_least=0)  # pointing tolerance, original-image pixels


@dataclass
class SanityOptions(MetricOptions):
    sanity_layers: list[str] | None = None  # layers to randomize, top first; null: automatic
    sanity_depth: int = option(2, at_least=1)  # automatic units: modules down to this depth
    sanity_max_steps: int | None = None  # randomize only the top k units


def _steps(s: dict[str, Any]) -> list[float]:
    return [k / int(s["steps"]) for k in range(int(s["steps"]) + 1)]


STEP = Dim("step", "fraction of the pixels deleted or inserted (k/steps)", _steps)

register(MetricSpec(
    name="deletion", compute=_M + "perturbation:deletion", Options=DeletionOptions,
    description="RISE deletion: the score while the most salient pixels are deleted",
    outputs=(OutputSpec("deletion", "target {score} with k/steps of the pixels deleted",
                        ("step",)),
             OutputSpec("deletion_auc", "area under the deletion curve")),
    dims=(STEP,),
    figures=(Figure("deletion_auc", "deletion_auc", "Deletion AUC", "lower",
                    help="area under the target score while the most salient pixels are "
                         "deleted"),)))

register(MetricSpec(
    name="insertion", compute=_M + "perturbation:insertion", Options=InsertionOptions,
    description="RISE insertion: the score while the most salient pixels are inserted",
    outputs=(OutputSpec("insertion", "target {score} with k/steps of the pixels inserted",
                        ("step",)),
             OutputSpec("insertion_auc", "area under the insertion curve")),
    dims=(STEP,),
    figures=(Figure("insertion_auc", "insertion_auc", "Insertion AUC", "higher",
                    help="area under the target score while the most salient pixels are "
                         "inserted"),)))

register(MetricSpec(
    name="confidence", compute=_M + "confidence:confidence",
    description="Average Drop and Increase in Confidence (Grad-CAM++), as torchcam",
    outputs=(OutputSpec("drop", "max(0, Y - O) / Y, Y = /confidence, O = explanation_score "
                                "(Average Drop = 100 x mean)"),
             OutputSpec("increase", "1 if O > Y (Increase in Confidence = 100 x mean)"),
             OutputSpec("explanation_score", "O: target class {confidence} of the input times "
                                             "the min-max normalized, upsampled map"),
             OutputSpec("confidence", "Y: target class {confidence} of the re-loaded image "
                                      "(the reference of drop and increase)",
                        per_map=False, since=2)),
    figures=(Figure("avg_drop", "drop", "Avg Drop", "lower", "{:.1f}", "%", 100,
                    help="Average Drop in confidence on input x normalized map (Grad-CAM++)"),
             Figure("increase", "increase", "Increase", "higher", "{:.1f}", "%", 100,
                    help="Increase in Confidence: share of images whose score rises "
                         "(Grad-CAM++)"))))

register(MetricSpec(
    name="road", compute=_M + "road:road", Options=RoadOptions,
    description="ROAD: most/least relevant pixels first, noisy linear imputation",
    outputs=(OutputSpec("road_morf", "target {score}, most relevant pixels imputed",
                        ("removed_percent",)),
             OutputSpec("road_lerf", "target {score}, least relevant pixels imputed",
                        ("removed_percent",)),
             OutputSpec("road", "mean over percentages of (LeRF - MoRF) / 2 "
                                "(pytorch-grad-cam's ROADCombined)")),
    dims=(Dim("removed_percent", "percent of the pixels imputed",
              lambda s: [float(q) for q in s["road_percentiles"]]),),
    figures=(Figure("road", "road", "ROAD", "higher",
                    help="ROAD: mean of (LeRF - MoRF) / 2 over the removal percentages"),)))

register(MetricSpec(
    name="pointing", compute=_M + "pointing:pointing", prepare=_M + "pointing:prepare",
    Options=PointingOptions,
    description="pointing game (Zhang et al.) and energy-based pointing game (Score-CAM)",
    outputs=(OutputSpec("pointing_hit", "1 if the map's maximum is within tolerance of a box; "
                                        "NaN: no box"),
             OutputSpec("pointing_energy", "share of the map's energy inside the boxes; NaN: "
                                           "no box"),
             OutputSpec("boxes", "ground-truth boxes (xmin, ymin, xmax, ymax) in original-image "
                                 "pixels, NaN rows: padding (what the model saw: /images/box "
                                 "of results.h5)", ("box", "corner"), per_map=False,
                        per_item=False, since=2)),
    dims=(Dim("box", "ground-truth box of the image", lambda s: list(range(s["max_boxes"]))),
          Dim("corner", "box coordinate", lambda s: ["xmin", "ymin", "xmax", "ymax"])),
    figures=(Figure("pointing", "pointing_hit", "Pointing", "higher", "{:.1f}", "%", 100,
                    help="pointing game: share of maxima within tolerance of a box"),
             Figure("energy", "pointing_energy", "Energy", "higher", "{:.1f}", "%", 100,
                    help="energy-based pointing game: share of the map inside the boxes"))))

register(MetricSpec(
    name="sanity", compute=_M + "sanity:sanity", prepare=_M + "sanity:prepare",
    Options=SanityOptions,
    description="cascading model-parameter randomization (Adebayo et al.)",
    outputs=(OutputSpec("sanity_spearman", "Spearman rho with the stored map after "
                                           "randomizing layers 0..j (top first)",
                        ("randomized_layer",)),),
    dims=(Dim("randomized_layer", "the unit randomized last (cascading from the top)",
              lambda s: list(s["sanity_units"])),),
    figures=(Figure("sanity_last", "sanity_spearman", "Sanity ρ", "zero", "{:.2f}",
                    reduce="last",
                    help="Spearman rho with the stored map once every unit is randomized "
                         "(about 0 passes the sanity check)"),)))
