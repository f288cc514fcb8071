"""Two real processes (gloo on CPU) train a few VAE steps and end with identical weights."""

import os
import re
import shutil
import subprocess
import textwrap

import pytest
import yaml

from conftest import tiny_vae_config

WORKER = textwrap.dedent("""
    import hashlib, sys
    import torch
    from stagediff.pipelines.config import load_config
    from stagediff.pipelines.data import load_data
    from stagediff.pipelines.registry import get_stage_kind
    from stagediff.pipelines.run import make_accelerator
    from stagediff.pipelines.trainer import train_stage
    from pathlib import Path

    config = load_config(sys.argv[1])
    accelerator = make_accelerator(config)
    data = load_data(config.data)
    stage_config = config.stages[0]
    stage_dir = Path(config.output_dir) / stage_config.name
    stage_dir.mkdir(parents=True, exist_ok=True)
    model, metrics = train_stage(accelerator, get_stage_kind(stage_config.kind)(stage_config, data), config, stage_dir)
    digest = hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes() for p in model.parameters())).hexdigest()
    print(f"RANK {accelerator.process_index} OF {accelerator.num_processes} WEIGHTS {digest}", flush=True)
""")


@pytest.mark.slow
def test_two_processes_train_identical_weights(tmp_path):
    config = tiny_vae_config(tmp_path / "run", max_steps=3, ema_decay=0.9, checkpointing_steps=3)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "worker.py").write_text(WORKER)
    # `accelerate launch --cpu --num_processes 2` silently starts ONE process; this starts two
    # gloo processes, and make_accelerator passes cpu=True when there is no GPU.
    command = [shutil.which("accelerate") or "accelerate", "launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", "29517", str(tmp_path / "worker.py"), str(tmp_path / "run.yaml")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = re.findall(r"RANK (\d) OF (\d) WEIGHTS (\w+)", result.stdout)
    assert sorted(rank for rank, _, _ in lines) == ["0", "1"], result.stdout
    assert {world for _, world, _ in lines} == {"2"}  # two processes really ran
    assert len({digest for _, _, digest in lines}) == 1  # and agree on every weight
    assert (tmp_path / "run" / "vae" / "checkpoints" / "checkpoint-3" / "random_states_1.pkl").is_file()
