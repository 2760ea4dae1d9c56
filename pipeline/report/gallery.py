"""Which images a run's gallery shows: the worst and the best by the first metric evaluate
stored (or, without metrics, by the top-1 probability), then a few per class, instead of
the first rows in file order (which, with class folders, are all one class).

Plain numpy in, row numbers out, so the choice is tested without a page.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

PER_CLASS = 2  # images per class in the "per class" sections, spread from worst to best
# Per-image metric dataset -> (label, "down" when lower is better), in the order evaluate
# computes them: the first one a map has is what the gallery ranks by.
RANKABLE: tuple[tuple[str, str, str], ...] = (
    ("deletion_auc", "deletion AUC", "down"),
    ("insertion_auc", "insertion AUC", "up"),
    ("drop", "drop in confidence", "down"),
    ("road", "ROAD", "up"),
    ("pointing_energy", "energy in the box", "up"),
)


@dataclass
class Ranking:
    """One value per row (NaN where there is none) and what it means."""

    label: str  # "deletion AUC of gradcam/layer4"
    values: np.ndarray  # (N,) float
    direction: str  # "down": lower is better; "up": higher is better
    source: tuple[str, str] | None = None  # (map key, metric dataset) ranked by, if any

    def worst_first(self, rows: np.ndarray) -> np.ndarray:
        """``rows`` from worst to best; rows without a value last, in row order."""
        rows = np.asarray(rows, dtype=np.int64)
        values = self.values[rows]
        finite = np.isfinite(values)
        badness = values[finite] if self.direction == "down" else -values[finite]
        ranked = rows[finite][np.argsort(-badness, kind="stable")]
        return np.concatenate([ranked, rows[~finite]])

    def ranked(self, rows: np.ndarray) -> np.ndarray:
        """Only the rows with a value, worst first."""
        return np.asarray([r for r in self.worst_first(rows) if np.isfinite(self.values[r])],
                          dtype=np.int64)


@dataclass
class Section:
    """A titled part of the gallery."""

    title: str
    note: str
    rows: list[int]


def choose(done: np.ndarray, ranking: Ranking, classes: np.ndarray,
           class_name: Callable[[int], str], budget: int, class_kind: str = "label",
           per_class: int = PER_CLASS) -> list[Section]:
    """The gallery's sections, ``budget`` images at most.

    All done images, worst first, when they fit; otherwise a third of the budget for the
    worst, a third for the best, and the rest for the most frequent classes, ``per_class``
    each (or an equal share of the rest, when that is more), spread from worst to best
    within the class.

    Args:
        done: The done rows.
        ranking: What "worst" and "best" mean.
        classes: Each row's class (its label, or its prediction without labels); -1 none.
        class_name: ``285 Egyptian cat`` for a class number.
        budget: ``report.max_images``.
        class_kind: "label" or "predicted class", for the section titles.
    """
    done = np.asarray(done, dtype=np.int64)
    if budget <= 0 or not len(done):
        return []
    if len(done) <= budget:
        return [Section(f"all {len(done)} images", f"sorted worst to best by {ranking.label}",
                        [int(r) for r in ranking.worst_first(done)])]
    ranked = ranking.ranked(done)
    k = max(1, budget // 3)
    worst = [int(r) for r in ranked[:k]]
    best = [int(r) for r in ranked[::-1][:k] if int(r) not in set(worst)]
    sections = []
    if worst:
        sections.append(Section(f"worst by {ranking.label}", f"{len(worst)} of {len(done)} "
                                "done images", worst))
    if best:
        sections.append(Section(f"best by {ranking.label}", f"{len(best)} of {len(done)} "
                                "done images", best))
    left = budget - len(worst) - len(best)
    shown = set(worst) | set(best)
    rest = np.asarray([r for r in done if int(r) not in shown], dtype=np.int64)
    if not len(rest) or left <= 0:
        return sections
    known = rest[classes[rest] >= 0]
    counts = {int(c): int(n) for c, n in zip(*np.unique(classes[known], return_counts=True),
                                             strict=True)}
    # A few per class; more each when there are few classes (the budget is not wasted).
    each = max(per_class, left // max(1, len(counts)))
    for cls in sorted(counts, key=lambda c: (-counts[c], c)):
        if left <= 0:
            break
        members = ranking.worst_first(known[classes[known] == cls])
        m = min(each, left, len(members))
        valued = ranking.ranked(members)  # spread over the rows with a value, if enough
        pool = valued if len(valued) >= m else members
        picks = pool[np.unique(np.round(np.linspace(0, len(pool) - 1, m)).astype(int))]
        left -= len(picks)
        sections.append(Section(f"per class · {class_kind} {class_name(cls)}",
                                f"{len(picks)} of its {counts[cls]} images not shown above, "
                                f"worst to best by {ranking.label}", [int(r) for r in picks]))
    return sections
