"""Pareto frontiers of sweep trials: which trials no other trial beats on both axes.

Pure functions (no MLflow, no Ray); ``workflows/frontier.py`` feeds them MLflow runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices (ascending) of the non-dominated points, both coordinates minimised.

    ``q`` dominates ``p`` when ``q <= p`` in both coordinates and ``q < p`` in at least one. So:

    - exact duplicates of a non-dominated point are all on the frontier (none dominates another);
    - a point equal to another in one coordinate and worse in the other is dominated;
    - one point is its own frontier; no points, no frontier;
    - a point with a NaN coordinate is never on the frontier and never dominates (it is not a
      measurement); an infinite coordinate compares as usual.

    O(n log n): sorted by (x, y), a point is non-dominated iff its y is the smallest among the
    points sharing its x and strictly below every y seen at smaller x.
    """
    valid = [i for i, (x, y) in enumerate(points) if not (math.isnan(x) or math.isnan(y))]
    order = sorted(valid, key=lambda i: (points[i][0], points[i][1]))
    front: list[int] = []
    best_y_left: float | None = None  # smallest y over all points with a strictly smaller x
    start = 0
    while start < len(order):
        x = points[order[start]][0]
        end = start
        while end < len(order) and points[order[end]][0] == x:
            end += 1
        group_min_y = points[order[start]][1]  # sorted, so the first of the group has the smallest y
        if best_y_left is None or group_min_y < best_y_left:
            front.extend(i for i in order[start:end] if points[i][1] == group_min_y)
        best_y_left = group_min_y if best_y_left is None else min(best_y_left, group_min_y)
        start = end
    return sorted(front)


def pareto_front_reference(points: Sequence[tuple[float, float]]) -> list[int]:
    """The definition, O(n^2): the reference that ``pareto_front`` is tested against."""
    def dominates(q: tuple[float, float], p: tuple[float, float]) -> bool:
        return q[0] <= p[0] and q[1] <= p[1] and (q[0] < p[0] or q[1] < p[1])

    valid = [i for i, p in enumerate(points) if not (math.isnan(p[0]) or math.isnan(p[1]))]
    return [i for i in valid if not any(dominates(points[j], points[i]) for j in valid if j != i)]
