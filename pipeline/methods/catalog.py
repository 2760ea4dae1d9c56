"""The shipped methods' declarations: name, options, kind of maps, use of target layers.

Torch-free on purpose (see ``declare.py``): the config schema of every method comes from
here, and the implementation of method ``<name>`` is the ``@register`` class of
``pipeline/methods/<name>.py``, imported only when it runs. Adding a shipped method is its
declaration here, its module, and ``conf/method/<name>.yaml`` (its schema plus defaults).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from .declare import AttributionOptions, CAMWeightOptions, MethodOptions, declare, option

ACTIVATION_DTYPES = ("float16", "float32")
INTEGRATIONS = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle",
                "riemann_trapezoid")
BASELINES = ("zero", "mean", "blur")
INTERPOLATE_MODES = ("nearest", "bilinear", "bicubic", "area", "nearest-exact")


@dataclass
class ActivationsOptions(MethodOptions):
    dtype: str = option("float16", choices=ACTIVATION_DTYPES)  # float16 | float32
    pool: str = option("none", choices=("none", "avg"))  # avg: global average over h, w -> (N, C)
    max_channels: int | None = None  # keep only the first k channels


@dataclass
class EigenCAMOptions(CAMWeightOptions):
    """Where the SVD runs, which decides the sign of the principal direction.

    ``host``: numpy's LAPACK on the CPU, the signs pytorch-grad-cam gets (its maps, exactly).
    ``device``: ``torch.linalg.svd`` on the activations' device, no host round trip; the
    sign is then fixed by a rule (the direction points along the mean activation), because
    torch's SVD (MKL, cuSOLVER) returns either sign, and no rule gives numpy's.
    """

    svd: str = option("host", choices=("host", "device"))


@dataclass
class GradCAMPlusPlusOptions(CAMWeightOptions):
    # 0: eq. 19 as written, a_ij = 0 only where its denominator is 0. 1e-6 is
    # pytorch-grad-cam's convention (added to every denominator): at gradients of ~1e-3 it is
    # as large as 2 g^2 and reorders the channels (tests/test_definitions.py).
    eps: float = option(0.0, at_least=0)


@dataclass
class GuidedGradCAMOptions(MethodOptions):
    # How the CAM is upsampled to the input (F.interpolate's modes; Captum's default).
    interpolate_mode: str = option("nearest", choices=INTERPOLATE_MODES)
    save_attribution: bool = False  # also store the signed (N, C, H, W) attribution per layer


@dataclass
class IntegratedGradientsOptions(MethodOptions):
    steps: int = 50  # path points (>= 1 for gausslegendre, >= 2 for the Riemann rules)
    integration: str = option("gausslegendre", choices=INTEGRATIONS)
    baseline: str = option("zero", choices=BASELINES)  # see integrated_gradients.baseline_of
    blur_sigma: float = option(10.0, above=0)  # baseline=blur: Gaussian sigma in pixels
    batch_steps: int = option(32, at_least=1)  # path points per forward pass (bounds memory)
    save_attribution: bool = False  # also store the signed (N, C, H, W) attribution

    def check(self) -> None:
        super().check()
        low = 1 if self.integration == "gausslegendre" else 2
        if self.steps < low:
            raise ConfigError(f"method.steps must be >= {low} for {self.integration}, "
                              f"got {self.steps}")


@dataclass
class ScoreCAMOptions(MethodOptions):
    batch_masks: int = option(64, at_least=1)  # masked inputs per forward pass (bounds memory)
    save_weights: bool = True  # also store the softmaxed scores under /scorecam_weights
    # Upsampling of the activation maps to the input: false (half-pixel centres) as the
    # official Score-CAM code's F.interpolate(mode="bilinear", align_corners=False); true is
    # pytorch-grad-cam's nn.UpsamplingBilinear2d.
    align_corners: bool = False


@dataclass
class SmoothGradOptions(MethodOptions):
    samples: int = option(50, at_least=1)  # noisy copies per image
    sigma: float = option(0.15, at_least=0)  # noise std as a fraction of each image's range
    batch_samples: int = option(32, at_least=1)  # noisy inputs per forward pass (bounds memory)
    seed: int = 0  # the noise is drawn once from this seed: reproducible, batch-independent
    save_attribution: bool = False  # also store the signed (N, C, H, W) mean gradient


# Saliency has no option: its signed gradient is SmoothGrad's with sigma=0.
declare("activations", ActivationsOptions, kind="activations")
declare("eigencam", EigenCAMOptions)  # the weights: the first principal direction, (N, C)
declare("gradcam", CAMWeightOptions)
declare("gradcampp", GradCAMPlusPlusOptions)
declare("guided_backprop", AttributionOptions, kind="input", uses_layers=False)
declare("guided_gradcam", GuidedGradCAMOptions, kind="input")  # per layer, at input size
declare("hirescam")
declare("integrated_gradients", IntegratedGradientsOptions, kind="input", uses_layers=False)
declare("layercam")
declare("saliency", kind="input", uses_layers=False)
declare("scorecam", ScoreCAMOptions)
declare("smoothgrad", SmoothGradOptions, kind="input", uses_layers=False)
declare("xgradcam", CAMWeightOptions)
