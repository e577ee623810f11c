"""pareto_front on hand-made points: ties, duplicates, single point, NaN; and against the O(n^2) definition."""

from __future__ import annotations

import math
import random

import pytest

from workflows.pareto import pareto_front, pareto_front_reference


@pytest.mark.parametrize(
    ("points", "expected"),
    [
        ([], []),
        ([(3.0, 0.5)], [0]),
        # a staircase: all non-dominated
        ([(1, 0.9), (2, 0.5), (4, 0.1)], [0, 1, 2]),
        # (3, 0.6) is beaten by (2, 0.5) on both
        ([(1, 0.9), (3, 0.6), (2, 0.5)], [0, 2]),
        # exact duplicates of a frontier point are all on it
        ([(2, 0.5), (1, 0.9), (2, 0.5)], [0, 1, 2]),
        # equal L0, worse FVU: dominated
        ([(2, 0.5), (2, 0.7)], [0]),
        # equal FVU, worse L0: dominated
        ([(2, 0.5), (3, 0.5)], [0]),
        # duplicates of a dominated point stay dominated
        ([(1, 0.1), (2, 0.5), (2, 0.5)], [0]),
        # NaN is never on the frontier and dominates nothing
        ([(math.nan, 0.0), (1, math.nan), (2, 0.5)], [2]),
        ([(1, 0.5), (0.5, math.inf)], [0, 1]),
    ],
)
def test_hand_made_points(points, expected):
    assert pareto_front(points) == expected
    assert pareto_front_reference(points) == expected


def test_agrees_with_the_definition_on_random_points_with_many_ties():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(0, 25)
        points = [(float(rng.randint(0, 6)), float(rng.randint(0, 6))) for _ in range(n)]
        assert pareto_front(points) == pareto_front_reference(points), points


def test_frontier_points_are_mutually_non_dominated_and_beat_the_rest():
    rng = random.Random(1)
    points = [(rng.random(), rng.random()) for _ in range(200)]
    front = pareto_front(points)
    assert front and len(front) < len(points)
    for i in front:
        assert not any(p[0] <= points[i][0] and p[1] <= points[i][1] and p != points[i] for p in points)
    for j in set(range(len(points))) - set(front):
        assert any(points[i][0] <= points[j][0] and points[i][1] <= points[j][1] for i in front)
