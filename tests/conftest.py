"""Shared test options: ``--full`` runs the full kernel grids (CI runs a representative subset)."""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Callable

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


@pytest.fixture(autouse=True)
def _no_launch_override(monkeypatch):
    """A $OPENLM_MAMBA_SCAN_LAUNCH left in the shell would pick every scan test's kernel and launch shape."""
    monkeypatch.delenv("OPENLM_MAMBA_SCAN_LAUNCH", raising=False)


def has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def help_parser(monkeypatch, main: Callable[[list[str]], object]) -> argparse.ArgumentParser:
    """Run ``main(["--help"])``, check it exits 0, and return the parser it parsed with."""
    parsers = []
    parse_args = argparse.ArgumentParser.parse_args

    def spy(self, *args, **kwargs):
        parsers.append(self)
        return parse_args(self, *args, **kwargs)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", spy)
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    return parsers[0]


def undocumented_flags(parser: argparse.ArgumentParser) -> list[str]:
    """The parser's flags without a help text."""
    return [a.option_strings[0] for a in parser._actions if a.option_strings and not a.help]


@pytest.fixture
def seed():
    torch.manual_seed(0)
    return 0
