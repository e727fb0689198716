"""`sdr-server bench --help` names every recipe the library knows, and nothing else."""

from __future__ import annotations

import argparse

from sdr_edge.bench.recipes import RECIPES
from sdr_edge_server import bench_cmd


def test_the_recipe_list_of_the_help_is_the_librarys():
    assert tuple(RECIPES) == bench_cmd.RECIPE_NAMES
    parser = argparse.ArgumentParser()
    bench_cmd.add_arguments(parser)
    text = " ".join(parser.format_help().split())
    assert all(name in text for name in RECIPES)
