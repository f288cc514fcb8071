import os

# Tests never touch the network: hub code paths are exercised with local data only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
from accelerate.state import AcceleratorState

from stagediff.pipelines.config import parse_run_config


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Accelerate keeps process-wide state (e.g. mixed precision); each test starts clean."""
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def tiny_vae_config(output_dir, **training) -> dict:
    """A raw run config for a VAE small enough to train a few steps in seconds."""
    return {
        "output_dir": str(output_dir),
        "seed": 0,
        "log_with": "none",
        "data": {"source": "mnist", "resolution": 16, "max_train_samples": 256},
        "stages": [{
            "name": "vae",
            "kind": "vae",
            "model": {"block_out_channels": [8, 16], "latent_channels": 2, "norm_num_groups": 8},
            "training": {"max_steps": 4, "batch_size": 16, "learning_rate": 1e-3, "log_every": 2, **training},
        }],
    }


@pytest.fixture
def tiny_config(tmp_path):
    def make(**training):
        return parse_run_config(tiny_vae_config(tmp_path / "run", **training))
    return make
