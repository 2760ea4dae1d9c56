"""Faithfulness and localisation metrics of stored maps, one module per family.

- :mod:`.common`: maps scaled to [0, 1] at the input's size; the target's score (``Scorer``)
- :mod:`.perturbation`: deletion and insertion curves and their AUC (RISE)
- :mod:`.confidence`: Average Drop and Increase in Confidence (Grad-CAM++)
- :mod:`.road`: ROAD, MoRF/LeRF with noisy linear imputation
- :mod:`.pointing`: the pointing game and the energy-based pointing game; box files
- :mod:`.sanity`: cascading model-parameter randomization (Spearman rho)
- :mod:`.file`: the metrics file ``metrics.h5`` (layout, writing, checked reading)

The families compute on torch tensors; this package itself and :mod:`.file` import no
torch, so the report reads metrics without it. :mod:`pipeline.evaluate` is the stage that
runs the families over a results file.
"""

# The metric names of ``evaluate.metrics``, in the order they are computed and shown.
METRICS = ("deletion", "insertion", "confidence", "road", "pointing", "sanity")
