"""Faithfulness and localisation metrics of stored maps, one module per family.

- :mod:`.registry`: the metric registry (declarations, layout, figures, config schema)
- :mod:`.declared`: the built-in metrics, each declared once (no torch)
- :mod:`.batch`: what a compute function sees (the evaluation, one batch)
- :mod:`.common`: maps scaled to [0, 1] at the input's size; the target's score (``Scorer``)
- :mod:`.perturbation`: deletion and insertion curves and their AUC (RISE)
- :mod:`.confidence`: Average Drop and Increase in Confidence (Grad-CAM++)
- :mod:`.road`: ROAD, MoRF/LeRF with noisy linear imputation
- :mod:`.pointing`: the pointing game and the energy-based pointing game; box files
- :mod:`.sanity`: cascading model-parameter randomization (Spearman rho)

The metrics file ``metrics.h5`` is read and written by :mod:`pipeline.store.metrics`. The
families compute on torch tensors; this package itself, :mod:`.registry` and
:mod:`.declared` import no torch, so read-only stages use the declarations without it.
:mod:`pipeline.evaluate` is the stage that runs the families over a results file.
"""

from .registry import METRICS, MetricSpec, OutputSpec, figures, per_map_columns

__all__ = ["METRICS", "MetricSpec", "OutputSpec", "figures", "per_map_columns"]
