"""Shared test options: ``--full`` runs the full kernel grids (CI runs a representative subset)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

torch.set_num_threads(max(1, torch.get_num_threads()))


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true", default=False, help="run the full test grids (slow)")


def pytest_configure(config):
    config.full_grid = config.getoption("--full")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--full"):
        return
    skip = pytest.mark.skip(reason="full grid only: run with --full")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


@pytest.fixture
def seed():
    torch.manual_seed(0)
    return 0
