import os

# Tests never touch the network: hub code paths are exercised with local data only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch
from accelerate.state import AcceleratorState

from stagediff.pipelines.registry import parse_run_config

from helpers import tiny_vae_config


def pytest_collection_modifyitems(items):
    """Files with `slow` tests run first (a stable sort: each file's tests stay together and in
    order). pytest-xdist hands whole files to its workers in this order (`--dist loadfile`), so
    the long ones start early and the short ones even out the end, rather than one worker finishing
    a minute-long file while the other core idles."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Accelerate keeps process-wide state (e.g. mixed precision); each test starts clean."""
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def tiny_config(tmp_path):
    def make(**training):
        return parse_run_config(tiny_vae_config(tmp_path / "run", **training))
    return make


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for a module of small convolutions and sorts: they gain nothing from
    more, while on a busy 2-core machine OpenMP barriers across 2 threads made such a file 9x
    slower (95 s against 11 s). Use it with `pytestmark = pytest.mark.usefixtures("single_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
