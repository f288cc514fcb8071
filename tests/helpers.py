"""What the tests share besides fixtures: tiny run configs. Imported as `from helpers import ...`
(pytest puts tests/ on the path); tests/reliability has its own `reliability.helpers`."""


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
