"""Shared fixtures and the --sweep switch (the full architecture sweep; CI runs it)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub


def pytest_addoption(parser):
    parser.addoption("--sweep", action="store_true", default=False, help="also run the full architecture sweep")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--sweep"):
        return
    skip = pytest.mark.skip(reason="architecture sweep: run with --sweep (CI does)")
    for item in items:
        if "sweep" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield
