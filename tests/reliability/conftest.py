import pytest
import torch

from helpers import tiny_vae_config

from .helpers import train


@pytest.fixture(scope="package", autouse=True)
def one_torch_thread():
    """The models here are tiny: one thread runs them fastest, and on a shared, busy CPU a second
    one can make them 100x slower (the two wait on each other). The rest of the suite keeps its own."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="package")
def trained_vae(tmp_path_factory, one_torch_thread) -> dict:
    """The raw config of a finished tiny VAE stage (16x16 digits; the suite's data, so evaluation
    shares its cached feature classifier); tests copy its run with `copy_run`."""
    raw = tiny_vae_config(tmp_path_factory.mktemp("vae") / "run", max_steps=2)
    train(raw)
    return raw
