"""Benchmark bookkeeping: medians and the profile's categories (the timings themselves are never asserted)."""

from types import SimpleNamespace

import pytest

from more_tools.benchmarks import classify
from more_tools.timing import summary


def test_median_of_an_even_number_of_rounds_is_the_middle_pair_mean():
    assert summary([4.0, 1.0, 3.0, 2.0])["median_s"] == 2.5
    assert summary([3.0, 1.0, 2.0])["median_s"] == 2.0


@pytest.mark.parametrize(
    ("name", "shapes", "category"),
    [
        # The experts' grouped products carry the expert count (stacked weights, group offsets): still expert compute.
        ("aten::_grouped_mm", [[1024, 512], [8, 512, 4096], [8]], "expert compute"),
        ("more::grouped_mm", [[1024, 512], [8, 512, 4096], [8]], "expert compute"),
        ("aten::mm", [[1024, 512], [512, 8]], "routing"),  # the router: (tokens, d) x (d, experts)
        ("aten::mm", [[1024, 512], [512, 4096]], "expert compute"),
        ("aten::sort", [[1024]], "sort"),
    ],
)
def test_profile_categories(name, shapes, category):
    assert classify(SimpleNamespace(name=name, input_shapes=shapes), num_experts=8) == category
