"""Shared fixtures and the --sweep switch (the full architecture sweep; CI runs it)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
# Where a test does not name a device, train on the CPU even on a GPU machine: the suite checks
# exact, seeded results (CUDA kernels may sum in another order run to run). The GPU paths are
# tested in test_cuda.py, which names its device.
os.environ.setdefault("WSURGERY_DEVICE", "cpu")

# pytest-xdist: share the cores between the workers. Each torch process otherwise starts one thread
# per core, and N workers x N threads on N cores oversubscribe: a 7 s test took 160 s that way.
# The environment variable reaches the subprocesses the tests start (CLI, DDP) too.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


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


@pytest.fixture
def one_thread():
    """One torch thread for the test (restored after): tiny models train fastest, and stably, on one
    thread of a shared CPU. Modules that train use it for every test via ``pytestmark``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
