"""Several processes: real two-process (gloo, CPU) runs checked against one process.

One `accelerate launch --config_file configs/accelerate/cpu_two_processes.yaml` (the module
fixture `two_process_runs`) runs a worker that, in two processes:
  1. resumes a one-process checkpoint with two processes (`resume_1to2`),
  2. validates untrained VAE and flow models on validation sets of sizes not divisible by
     2 processes x batch (`evaluation`),
  3. trains a flow from scratch with `stagediff.pipelines.run.run` (`fresh`).
Rank 1 records every file it creates, writes, renames or deletes through Python under the test's
folder; its umask (0o222, rank 0: 0o022) also marks every file or folder it creates by any other
code (safetensors and torch.save write from Rust and C++). One-process references run in this
pytest process.

The model for the exact comparisons is a normalizing flow on 2D toy vectors: its loss, the
exact negative log-likelihood, is a deterministic function of the batch (no noise is drawn
while training vectors; DDPM and VAE losses draw noise per process, so their weights depend on
the process count through the random streams, not only through float rounding).
"""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

from stagediff.pipelines.registry import parse_run_config
from stagediff.pipelines.run import run

from helpers import tiny_vae_config

REPO = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIGS = REPO / "configs" / "accelerate"
BATCH = 8  # per process, with 2 processes; the one-process references use 2 x BATCH
STEPS, HALF = 6, 3
# Float tolerance for weights reached by different reduction orders (DDP's all-reduce of two
# half-batch gradients vs one full-batch gradient). Different data or a wrong learning rate
# moves the weights by ~lr = 1e-3 per step, two orders above it.
ATOL = 2e-5


def flow_config(output_dir, batch_size=2 * BATCH, **training) -> dict:
    """A raw config: a small affine-coupling flow on 64 training points of the two moons (4 steps
    of 16 per epoch, so 6 steps cross an epoch), 60 validation points (not a multiple of 16),
    cosine schedule with warm-up, EMA, validation, previews and checkpoints at step 3 and 6."""
    return {
        "output_dir": str(output_dir), "seed": 0, "log_with": "none", "mixed_precision": "no",
        "data": {"source": "toy", "toy": "moons", "toy_samples": 600, "max_train_samples": 64},
        "stages": [{
            "name": "flow", "kind": "flow",
            "model": {"steps_per_scale": 3, "hidden_channels": 16, "num_blocks": 1, "num_eval_samples": 64},
            "training": {"max_steps": STEPS, "batch_size": batch_size, "learning_rate": 1e-3,
                         "lr_scheduler": "cosine", "lr_warmup_steps": 2, "ema_decay": 0.9, "log_every": 1,
                         "eval_every": HALF, "sample_every": HALF, "checkpointing_steps": HALF, **training},
        }],
    }


def vae_eval_config(output_dir) -> dict:
    """The tiny VAE without dequantization, on 37 validation digits (37 = 2 x 2 x 8 + 5)."""
    raw = tiny_vae_config(output_dir, batch_size=BATCH)
    raw["data"]["validation_fraction"] = 37 / 5000
    raw["stages"][0]["model"]["dequantize"] = False
    return raw


WORKER = textwrap.dedent("""
    import builtins, hashlib, io, json, os, shutil, sys
    from pathlib import Path

    RANK = int(os.environ["RANK"])
    # What rank 1 creates, by any code (safetensors and torch.save write from Rust and C++), has no
    # write permission bits; what rank 0 creates keeps its owner's (safetensors: 0o600).
    os.umask(0o022 if RANK == 0 else 0o222)
    spec = json.loads(Path(sys.argv[1]).read_text())
    WATCHED = os.path.realpath(spec["watched"])
    changed = []  # paths under WATCHED that this process created, wrote, renamed or deleted

    def record(*paths):
        for path in paths:
            if isinstance(path, (str, bytes, os.PathLike)):
                path = os.path.realpath(os.fsdecode(path))
                if path.startswith(WATCHED):
                    changed.append(path)

    def watch(function, writes=lambda *a, **k: True, paths=1):
        def wrapper(*args, **kwargs):
            result = function(*args, **kwargs)
            if writes(*args, **kwargs):
                record(*args[:paths])
            return result
        return wrapper

    if RANK != 0:  # rank 0 may write; rank 1 records what it does
        writing_mode = lambda file, mode="r", *a, **k: any(c in mode for c in "wax+")
        builtins.open = io.open = watch(builtins.open, writing_mode)
        os.open = watch(os.open, lambda path, flags, *a, **k: bool(
            flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC)))
        for name in ("mkdir", "remove", "unlink", "rmdir"):
            setattr(os, name, watch(getattr(os, name)))
        for name in ("rename", "replace"):
            setattr(os, name, watch(getattr(os, name), paths=2))
        shutil.rmtree = watch(shutil.rmtree)
        probe = Path(WATCHED, "probe-rank1")  # the recording itself works: open, pathlib, os.remove
        with open(probe, "w") as f:
            f.write("x")
        probe.write_text("y")
        os.remove(probe)

    import torch
    from torch.utils.data import DataLoader
    from stagediff.pipelines.registry import parse_run_config
    from stagediff.pipelines.data import load_data
    from stagediff.pipelines.registry import get_stage_kind
    from stagediff.pipelines.run import make_accelerator, run
    from stagediff.pipelines.trainer import train_stage

    results = {}

    def emit(key, value):  # to a file per rank, at the end: two processes' stdout lines interleave
        results[key] = value

    def digest(model):
        return hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes() for p in model.parameters())).hexdigest()

    # 1. A one-process checkpoint resumed with two processes (train_stage: run() would end the
    #    process group, which the later parts need).
    config = parse_run_config(spec["resume_1to2"])
    accelerator = make_accelerator(config)
    emit("world", [accelerator.process_index, accelerator.num_processes, str(accelerator.device),
                   str(accelerator.distributed_type)])
    stage_config = config.stages[0]
    stage_dir = Path(config.output_dir) / stage_config.name
    if accelerator.is_main_process:
        stage_dir.mkdir(parents=True)
    accelerator.wait_for_everyone()
    model, metrics = train_stage(accelerator, get_stage_kind(stage_config.kind)(stage_config, load_data(config.data)),
                                 config, stage_dir)
    emit("resume_1to2_digest", digest(model))

    # 2. Validation of fixed (untrained) models on validation sets not divisible by 2 x batch.
    sys.path.insert(0, spec["tests"])
    from test_distributed import validate_untrained
    for name in ("vae", "flow"):
        emit(f"validate_{name}", validate_untrained(parse_run_config(spec["evaluation"][name])))
    # What the VAE's validation relies on: the prepared loader plus gather_for_metrics yield
    # every index exactly once, whatever the size.
    counts = {}
    for size in (37, 32, 3, 1):
        loader = accelerator.prepare(DataLoader(torch.arange(size), batch_size=8))
        gathered = torch.cat([accelerator.gather_for_metrics(batch) for batch in loader])
        counts[size] = sorted(gathered.tolist())
        accelerator.free_memory()
    emit("gathered_indices", counts)

    # 3. A fresh two-process run through the whole staged job (last: it ends the process group).
    emit("fresh_metrics", run(parse_run_config(spec["fresh"]))["flow"])
    emit("changed", sorted(set(changed)))
    Path(spec["results"], f"rank{RANK}.json").write_text(json.dumps(results))
""")


def train_here(raw: dict) -> dict:
    """Run a raw config in this process (one process), as `stagediff train` does."""
    try:
        return run(parse_run_config(raw))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def launch_two_processes(script: Path, *args: str) -> subprocess.CompletedProcess:
    """`accelerate launch` of `script` in two gloo processes, through configs/accelerate/cpu_two_processes.yaml;
    port 0: accelerate picks a free rendezvous port, so concurrent test runs never clash."""
    command = [shutil.which("accelerate") or "accelerate", "launch",
               "--config_file", str(ACCELERATE_CONFIGS / "cpu_two_processes.yaml"),
               "--main_process_port", "0", str(script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=REPO)


def results_of(folder: Path) -> dict:
    """{(key, rank): value} from the worker's result files."""
    return {(key, rank): value for rank in (0, 1)
            for key, value in json.loads((folder / f"rank{rank}.json").read_text()).items()}


def checkpoint_weights(stage_dir: Path, step: int) -> dict[str, torch.Tensor]:
    """The raw (model.safetensors) and EMA weights of a stage's checkpoint at `step`."""
    folder = stage_dir / "checkpoints" / f"checkpoint-{step}"
    raw = {f"model.{k}": v for k, v in load_file(folder / "model.safetensors").items()}
    return raw | {f"ema.{k}": v for k, v in load_file(folder / "ema.safetensors").items()}


def assert_same_weights(ours: dict, reference: dict) -> None:
    assert ours.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(ours[key], reference[key], atol=ATOL, rtol=0, msg=lambda m: f"{key}: {m}")


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    results = tmp_path_factory.mktemp("distributed_results")  # outside `root`, which rank 1 must not write to
    # One process with twice the batch: the reference, and the checkpoint resumed with two.
    reference = root / "one_process"
    train_here(flow_config(reference))
    spec = {
        "watched": str(root), "results": str(results), "tests": str(REPO / "tests"),
        "resume_1to2": flow_config(root / "resume_1to2", batch_size=BATCH, resume_from_checkpoint=str(
            reference / "flow" / "checkpoints" / f"checkpoint-{HALF}")),
        "evaluation": {"vae": vae_eval_config(root / "eval_vae"), "flow": flow_config(root / "eval_flow", batch_size=BATCH)},
        "fresh": flow_config(root / "two_processes", batch_size=BATCH),
    }
    (results / "spec.json").write_text(json.dumps(spec))
    (results / "worker.py").write_text(WORKER)
    launched = launch_two_processes(results / "worker.py", str(results / "spec.json"))
    assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-5000:]
    return {"root": root, "reference": reference, "stdout": launched.stdout, "results": results_of(results)}


# ----------------------------------------------------------------------------- configs, SLURM


@pytest.mark.parametrize("name, distributed_type, mixed_precision, processes", [
    ("single_gpu.yaml", "NO", "no", 1),
    ("multi_gpu_ddp_bf16.yaml", "MULTI_GPU", "bf16", 8),
    ("multi_node.yaml", "MULTI_GPU", "bf16", 16),
    ("fsdp.yaml", "FSDP", "bf16", 8),
    ("cpu_two_processes.yaml", "MULTI_GPU", "no", 2),
])
def test_accelerate_configs_load_with_accelerates_own_loader(name, distributed_type, mixed_precision, processes):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    config = load_config_from_file(str(ACCELERATE_CONFIGS / name))  # unknown keys raise here
    assert isinstance(config, ClusterConfig)
    assert (config.distributed_type.value, config.mixed_precision, config.num_processes) == (
        distributed_type, mixed_precision, processes)
    text = (ACCELERATE_CONFIGS / name).read_text()
    assert text.startswith("#") and "accelerate launch --config_file configs/accelerate/" + name in text
    if name == "multi_node.yaml":
        assert config.num_machines == 2 and config.main_process_ip and config.machine_rank == 0
    if name == "fsdp.yaml":
        assert config.fsdp_config["fsdp_reshard_after_forward"] is True  # full shard
        assert config.fsdp_config["fsdp_auto_wrap_policy"] == "SIZE_BASED_WRAP"
    if name == "cpu_two_processes.yaml":
        assert config.use_cpu


def test_every_accelerate_config_is_tested():
    tested = {"single_gpu.yaml", "multi_gpu_ddp_bf16.yaml", "multi_node.yaml", "fsdp.yaml", "cpu_two_processes.yaml"}
    assert {p.name for p in ACCELERATE_CONFIGS.glob("*.yaml")} == tested


def test_fsdp_config_reaches_accelerates_fsdp_plugin(monkeypatch):
    """What `accelerate launch` would export for fsdp.yaml builds accelerate's FSDP plugin, and the
    UNet block classes its comment suggests for block-wise wrapping exist in a diffusers UNet."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env
    from diffusers import UNet2DModel

    args = launch_command_parser().parse_args(
        ["--config_file", str(ACCELERATE_CONFIGS / "fsdp.yaml"), "--main_process_port", "0", "scripts/train.py"])
    args, _, _ = _validate_launch_command(args)
    assert args.use_fsdp and args.num_processes == 8
    for key, value in prepare_multi_gpu_env(args).items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True and plugin.min_num_params == 1_000_000
    text = (ACCELERATE_CONFIGS / "fsdp.yaml").read_text()
    classes = re.search(r"fsdp_transformer_layer_cls_to_wrap: (\S+)", text).group(1).split(",")
    unet = UNet2DModel(sample_size=8, block_out_channels=(8, 16), norm_num_groups=8, layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    assert {type(m).__name__ for m in unet.modules()} >= set(classes)


FAKE_SRUN = """#!/usr/bin/env bash
# srun --ntasks-per-node=1 on SLURM_NNODES nodes: the command once per node, with its SLURM_NODEID.
while [[ $# -gt 0 && $1 == --* ]]; do shift; done
for ((node = 0; node < SLURM_NNODES; node++)); do SLURM_NODEID=$node SLURM_PROCID=$node "$@" || exit $?; done
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
[[ "$1 $2" == "show hostnames" ]] && printf 'gpu-node-07\\ngpu-node-08\\ngpu-node-09\\n'
"""
# `accelerate` as accelerate launch parses and validates it, printing what torchrun would start.
FAKE_ACCELERATE = """#!{python}
import json, sys
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils.launch import prepare_multi_gpu_env
assert sys.argv[1] == "launch"
args, _, _ = _validate_launch_command(launch_command_parser().parse_args(sys.argv[2:]))
prepare_multi_gpu_env(args)
print("LAUNCH " + json.dumps({{"argv": sys.argv[2:], "multi_gpu": args.multi_gpu, "nnodes": args.nnodes,
      "nproc_per_node": args.nproc_per_node, "node_rank": args.node_rank, "rdzv_endpoint": args.rdzv_endpoint,
      "script": args.training_script, "script_args": args.training_script_args}}))
"""


def test_slurm_script_launches_one_accelerate_per_node(tmp_path):
    script = REPO / "scripts" / "slurm_train.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    header = script.read_text()
    for line in ("#SBATCH --nodes=", "#SBATCH --gpus-per-node=", "#SBATCH --ntasks-per-node=1"):
        assert line in header
    fake = tmp_path / "bin"
    fake.mkdir()
    for name, text in {"srun": FAKE_SRUN, "scontrol": FAKE_SCONTROL,
                       "accelerate": FAKE_ACCELERATE.format(python=sys.executable)}.items():
        (fake / name).write_text(text)
        (fake / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu-node-[07-09]",
           "SLURM_NNODES": "3", "SLURM_GPUS_PER_NODE": "a100:4", "SLURM_SUBMIT_DIR": str(REPO),
           "MAIN_PROCESS_PORT": "29561"}
    env.pop("SLURM_GPUS_ON_NODE", None)
    env.pop("GPUS_PER_NODE", None)
    result = subprocess.run(["bash", str(script), "configs/mnist_ldm.yaml", "seed=1"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    launches = [json.loads(line[len("LAUNCH "):]) for line in result.stdout.splitlines() if line.startswith("LAUNCH ")]
    assert [launch["node_rank"] for launch in launches] == [0, 1, 2]  # machine rank = SLURM_NODEID
    for launch in launches:
        assert launch["argv"][:2] == ["--config_file", "configs/accelerate/multi_node.yaml"]
        assert launch["multi_gpu"] and launch["nnodes"] == "3" and launch["nproc_per_node"] == "4"  # 12 in all
        assert launch["rdzv_endpoint"] == "gpu-node-07:29561"  # the first host of the allocation
        assert (launch["script"], launch["script_args"]) == (
            "scripts/train.py", ["--config", "configs/mnist_ldm.yaml", "seed=1"])
    assert "3 nodes x 4 GPUs = 12 processes" in result.stdout


def test_slurm_script_refuses_to_run_outside_slurm(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    result = subprocess.run(["bash", str(REPO / "scripts" / "slurm_train.sh"), "configs/mnist_ldm.yaml"], env=env,
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode != 0 and "sbatch" in result.stderr


# ----------------------------------------------------------------------------- two real processes


@pytest.mark.slow
def test_two_processes_really_ran_and_agree(two_process_runs):
    results = two_process_runs["results"]
    assert results["world", 0][:2] == [0, 2] and results["world", 1][:2] == [1, 2]
    assert results["world", 0][3] == "DistributedType.MULTI_CPU"  # gloo processes, not two lone runs
    assert results["resume_1to2_digest", 0] == results["resume_1to2_digest", 1]  # replicas agree
    # The start-of-run line, once (main process), with the effective batch and the unscaled rate.
    starts = [line for line in two_process_runs["stdout"].splitlines() if "effective batch" in line]
    assert len(starts) == 2, starts  # two stages trained by the worker's parts 1 and 3
    assert starts[-1] == ("[flow] effective batch 16 = 8 per process x 1 accumulation step(s) x 2 process(es) "
                          "on cpu; lr 0.001 as configured (not scaled with the 2 process(es))")
    metrics = json.loads((two_process_runs["root"] / "two_processes" / "flow" / "metrics.json").read_text())
    assert (metrics["effective_batch_size"], metrics["num_processes"]) == (16, 2)
    history = [json.loads(line) for line in open(two_process_runs["root"] / "two_processes" / "flow" / "history.jsonl")]
    speeds = [row for row in history if "images_per_s" in row]
    assert speeds and all(row["images_per_s_per_process"] == pytest.approx(row["images_per_s"] / 2) for row in speeds)


@pytest.mark.slow
def test_two_processes_of_batch_b_match_one_process_of_batch_2b(two_process_runs):
    """(a) With split_batches=False, accelerate gives process p the batches p, p + 2, ... of the
    same seeded permutation (use_seedable_sampler, data_seed = seed) cut into batches of B; so
    step k of two processes sees batches 2k and 2k + 1, exactly the k-th batch of 2B of one
    process (the same permutation, also after the epoch boundary at step 4). DDP averages the two
    half-batch mean gradients: the mean over 2B. The learning-rate schedule steps once per
    optimizer step whatever the process count (cosine with warm-up here). The only difference left is float summation order; a gradient-accumulation run (1 process, batch
    B, 2 micro-batches per step: the same 2B examples) is held to the same tolerance."""
    two = two_process_runs["root"] / "two_processes" / "flow"
    one = two_process_runs["reference"] / "flow"
    for step in (HALF, STEPS):
        assert_same_weights(checkpoint_weights(two, step), checkpoint_weights(one, step))
    initial = initial_weights(parse_run_config(flow_config(one)))
    trained = checkpoint_weights(one, STEPS)
    moved = max((trained[f"model.{k}"] - v).abs().max().item() for k, v in initial.items() if v.is_floating_point())
    assert moved > 50 * ATOL  # training moved the weights far beyond the tolerance
    accumulated = two_process_runs["root"] / "accumulated"
    train_here(flow_config(accumulated, batch_size=BATCH, gradient_accumulation_steps=2))
    assert_same_weights(checkpoint_weights(accumulated / "flow", STEPS), checkpoint_weights(one, STEPS))


@pytest.mark.slow
def test_only_the_main_process_writes(two_process_runs):
    """(b) Rank 1 creates, writes, renames and deletes nothing under the runs' folders but
    accelerate's own per-process RNG state (random_states_1.pkl) in each checkpoint: through
    Python (open, pathlib, os, shutil: recorded) and through anything else (its umask marks what it
    creates). The shared files (logs, metrics, checkpoints, previews, exports) exist once, each log
    row once."""
    root = two_process_runs["root"]
    changed = two_process_runs["results"]["changed", 1]
    assert changed == [str(root.resolve() / "probe-rank1")]  # its self-test, and nothing else
    created_by_rank_1 = sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.stat().st_mode & 0o200)
    assert created_by_rank_1 and all(p.endswith("/random_states_1.pkl") for p in created_by_rank_1), created_by_rank_1
    for run_dir in ("two_processes", "resume_1to2"):
        stage_dir = root / run_dir / "flow"
        rows = (stage_dir / "history.jsonl").read_text().splitlines()
        assert len(rows) == len(set(rows))
        first = HALF + 1 if run_dir == "resume_1to2" else 1
        assert [json.loads(r)["step"] for r in rows if "loss" in json.loads(r)] == list(range(first, STEPS + 1))
        for step in (HALF, STEPS) if run_dir == "two_processes" else (STEPS,):
            assert (stage_dir / "checkpoints" / f"checkpoint-{step}" / "random_states_1.pkl").is_file()
    stage_dir = root / "two_processes" / "flow"
    assert json.loads((stage_dir / "metrics.json").read_text())["num_processes"] == 2
    for name in ("done.json", "config.yaml", "samples.png", "samples/step-000003.png", "flow/config.json",
                 "flow/diffusion_pytorch_model.safetensors"):
        assert (stage_dir / name).is_file(), name


@pytest.mark.slow
def test_validation_counts_each_example_once(two_process_runs):
    """(c) gather_for_metrics over the prepared loader yields every validation index exactly once
    with two processes, for sizes that are and are not multiples of 2 x batch; and the VAE's
    validation (which gathers per-example terms with it) gives the one-process values. Compared:
    the closed-form KL and the posterior-mean reconstruction error, deterministic given the
    weights (dequantize off); the ELBO's reconstruction term draws a reparameterized sample per
    example, whose noise depends on how the examples are split between processes."""
    results = two_process_runs["results"]
    assert results["gathered_indices", 0] == {str(n): list(range(n)) for n in (37, 32, 3, 1)}
    config = parse_run_config(vae_eval_config(two_process_runs["root"] / "eval_vae_one"))
    one = one_process_validation(config)
    two = results["validate_vae", 0]
    assert two == results["validate_vae", 1]
    for key in ("kl_nats", "recon_mse"):
        assert two[key] == pytest.approx(one[key], rel=1e-6), key


@pytest.mark.slow
def test_flow_validation_with_two_processes_matches_one_process(two_process_runs):
    """The validation set (not a multiple of processes x batch) is padded for the last round;
    stages gather per-example values with gather_for_metrics, which drops the padding."""
    config = parse_run_config(flow_config(two_process_runs["root"] / "eval_flow_one", batch_size=BATCH))
    one = one_process_validation(config)
    assert two_process_runs["results"]["validate_flow", 0]["val_nll_nats"] == pytest.approx(one["val_nll_nats"], rel=1e-6)


def initial_weights(config) -> dict[str, torch.Tensor]:
    """The weights every process starts from (the trainer seeds, then builds the model)."""
    from accelerate.utils import set_seed

    from stagediff.pipelines.data import load_data
    from stagediff.pipelines.registry import get_stage_kind

    stage_config = config.stages[0]
    set_seed(config.seed)
    return get_stage_kind(stage_config.kind)(stage_config, load_data(config.data)).build_model().state_dict()


def validate_untrained(config) -> dict:
    """The first stage's validation of its seeded, untrained model, in the processes running."""
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader

    from stagediff.pipelines.data import load_data
    from stagediff.pipelines.registry import get_stage_kind
    from stagediff.pipelines.run import make_accelerator

    accelerator = make_accelerator(config)
    stage_config = config.stages[0]
    stage = get_stage_kind(stage_config.kind)(stage_config, load_data(config.data))
    set_seed(config.seed)
    model = stage.build_model().eval()
    loader = accelerator.prepare(DataLoader(stage.data.validation, batch_size=stage_config.training.batch_size))
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        metrics = stage.validate(model, loader, accelerator)
    accelerator.free_memory()
    return metrics


def one_process_validation(config) -> dict:
    try:
        return validate_untrained(config)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.slow
def test_resume_with_another_process_count(two_process_runs):
    """(d) A checkpoint resumes with another number of processes, at its step, and, when the
    global batch is kept (2 processes x B <-> 1 process x 2B), ends with the weights of the
    uninterrupted run (float tolerance): model, optimizer, learning-rate schedule (one step per
    optimizer step, whatever the process count; before, a schedule stepped once per process made
    the 1 -> 2 resume run at the wrong learning rate), EMA and data position (counted in
    steps x per-process batches: the same examples when the global batch is the same).

    Not identical: the random streams. A one-process checkpoint holds no RNG state for process 1,
    which starts its own seeded stream; a two-process checkpoint's process-1 state is unused by one
    process. Stages that draw noise while training (DDPM, VAE, dequantized pixels) therefore
    continue with other, equally valid, noise. When the global batch changes (e.g. 2 x B -> 1 x B),
    the step count is kept and the data position is `step` batches of the new size into the epoch,
    which is not where the old run stopped reading."""
    root = two_process_runs["root"]
    reference = checkpoint_weights(two_process_runs["reference"] / "flow", STEPS)
    # 1 -> 2 ran in the launch: resumed at step 3, then the same weights as one process straight.
    rows = [json.loads(line) for line in open(root / "resume_1to2" / "flow" / "history.jsonl")]
    assert min(r["step"] for r in rows) == HALF + 1
    assert_same_weights(checkpoint_weights(root / "resume_1to2" / "flow", STEPS), reference)
    # 2 -> 1: the two-process run's checkpoint at step 3, continued by one process with batch 2B.
    checkpoint = root / "two_processes" / "flow" / "checkpoints" / f"checkpoint-{HALF}"
    resumed = root / "resume_2to1"
    train_here(flow_config(resumed, resume_from_checkpoint=str(checkpoint)))
    rows = [json.loads(line) for line in open(resumed / "flow" / "history.jsonl")]
    assert [r["step"] for r in rows if "loss" in r] == list(range(HALF + 1, STEPS + 1))
    assert_same_weights(checkpoint_weights(resumed / "flow", STEPS), reference)
    two = checkpoint_weights(root / "two_processes" / "flow", STEPS)
    assert_same_weights(checkpoint_weights(resumed / "flow", STEPS), two)
