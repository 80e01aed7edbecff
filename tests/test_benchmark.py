"""benchmarks/benchmark.py's pairing of uncached and cached runs (its timed runs are the benchmark
itself, minutes long, so they are not run here)."""

from __future__ import annotations

import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

from benchmark import paired_speedup, round_order


def test_each_path_runs_first_in_half_the_rounds():
    orders = [round_order(index) for index in range(4)]
    assert all(sorted(order) == [False, True] for order in orders)
    assert [order[0] for order in orders].count(True) == 2


def test_the_speedup_is_the_median_of_the_rounds_ratios():
    # The ratio of the paths' medians (2.0 / 1.5 s = 1.33x) would divide times from different
    # rounds; round by round, the cache gained 2x once and nothing twice.
    result = paired_speedup([3.0, 1.0, 2.0], [1.5, 1.0, 2.0])
    assert result == {"speedup": 1.0, "speedup_by_round": [2.0, 1.0, 1.0]}


def test_three_paths_take_every_place_in_turn():
    # diffusers' script, ours uncached and ours cached: each runs first, second and third once in
    # three rounds, so a machine that drifts over a round favours none of them.
    paths = ("diffusers", "uncached", "cached")
    orders = [round_order(index, paths) for index in range(3)]
    assert all(sorted(order) == sorted(paths) for order in orders)
    for place in range(3):
        assert sorted(order[place] for order in orders) == sorted(paths)
