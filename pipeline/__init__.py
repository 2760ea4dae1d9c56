"""camsweep: Grad-CAM, saliency and layer activations for whole datasets."""

__version__ = "0.1.0"
