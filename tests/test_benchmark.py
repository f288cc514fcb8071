"""`stagediff benchmark` (the benchmarks/ package) on tiny settings: it runs end to end and writes
its report, the compiled path runs, the baseline loop trains, FLOPs match a hand count, the latent
cache's data section measures what it names."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from accelerate import Accelerator

from stagediff.benchmarks import cli, data
from stagediff.benchmarks.flops import count_flops, matmul_peak
from stagediff.benchmarks.loops import baseline_loop
from stagediff.pipelines.config import TrainingConfig
from stagediff.pipelines.data import InMemoryDataset
from stagediff.pipelines.registry import parse_run_config
from stagediff.pipelines.run import run

TINY = {
    "seed": 0, "log_with": "none",
    "data": {"source": "mnist", "resolution": 16, "max_train_samples": 256, "max_eval_samples": 128},
    "stages": [
        {"name": "vae", "kind": "vae",
         "model": {"block_out_channels": [8, 16], "latent_channels": 2, "norm_num_groups": 8},
         "training": {"max_steps": 2, "batch_size": 16}},
        {"name": "ldm", "kind": "ddpm", "input": "vae",
         "model": {"block_out_channels": [8, 16], "attention": [False, True], "norm_num_groups": 8,
                   "num_train_timesteps": 50, "num_inference_steps": 2, "num_eval_samples": 8},
         "training": {"max_steps": 2, "batch_size": 16, "ema_decay": 0.9}},
    ],
}
TINY_TIMING = ["--steps", "2", "--warmup", "1", "--repeats", "2", "--rounds", "1", "--batch-size", "16",
               "--threads", "1"]


@pytest.fixture
def tiny_run(tmp_path):
    """A tiny demo config, trained (VAE, then a latent DDPM), and its path."""
    raw = {**TINY, "output_dir": str(tmp_path / "run")}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    run(parse_run_config(raw))
    return path


@pytest.mark.slow
def test_the_benchmark_runs_end_to_end_and_writes_its_report(tiny_run, tmp_path, capsys):
    out = tmp_path / "report.json"
    threads = torch.get_num_threads()
    try:
        cli.main(["--config", str(tiny_run), *TINY_TIMING, "--precision", "fp32", "--n", "4",
                  "--compile", "eager", "--skip-data", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    report = json.loads(out.read_text())
    assert set(report) >= {"machine", "settings", "training", "speedup_vs_baseline", "latent_vs_pixel", "flops",
                           "data_pipeline", "sampling", "targets"}
    training = report["training"]
    assert set(training) == {"ours_latent_fp32", "baseline_latent_fp32", "ours_latent_fp32_compiled", "ours_pixel_fp32"}
    for name, result in training.items():
        assert result["images_per_s"] > 0 and len(result["window_images_per_s"]) == 2, name
        assert result["peak_rss_mib"] > 0, name
    assert training["ours_latent_fp32"]["sample_shape"] == [2, 8, 8]
    assert training["ours_pixel_fp32"]["sample_shape"] == [1, 16, 16]
    assert training["ours_latent_fp32_compiled"]["compile"] == "eager"
    assert training["baseline_latent_fp32"]["parameter_change_l1"] > 0
    assert len(training["ours_latent_fp32"]["round_images_per_s"]) == 1
    assert report["flops"]["flop_per_step"] > 0 and 0 < report["flops"]["fraction_of_peak"]
    assert report["data_pipeline"]["latent"]["loader_images_per_s"] > 0
    samplers = [(r["sampler"], r["steps"]) for r in report["sampling"]["results"]]
    assert samplers == [("ddpm", None), ("ddim", 50), ("dpmsolver", 10), ("dpmsolver", 20)]
    assert all("fd" in r and r["sampling_seconds_per_sample"] > 0 for r in report["sampling"]["results"])
    assert {t["goal"] for t in report["targets"]} >= {">= 2x", ">= 8x", ">= 0.40", "<= 1.10", ">= 40x"}
    printed = capsys.readouterr().out
    assert "| ours / baseline, latent, fp32 |" in printed and "| target | goal | measured | met |" in printed


def test_the_data_section_measures_shards_against_memory_and_encoding_by_process_count(tmp_path, monkeypatch, capsys):
    """`--data-only` on tiny sizes, its processes run here: the probes and the encode workers
    (the benchmark itself runs each in a fresh process, two of them under accelerate launch)."""
    def launch_here(spec, processes):
        Path(spec["result"]).parent.mkdir(parents=True, exist_ok=True)
        data.encode_worker(spec)
        return {**json.loads(Path(spec["result"]).read_text()), "cache": spec["cache"]}

    monkeypatch.setattr(data, "in_fresh_process", lambda function, *args: function(*args))
    monkeypatch.setattr(data, "launch_encode", launch_here)
    monkeypatch.setattr(data, "free_cores_now", lambda: 2.0)  # measured in spawned processes
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "output_dir": str(tmp_path / "run")}))
    out = tmp_path / "report.json"
    threads = torch.get_num_threads()
    try:
        cli.main(["--config", str(config), *TINY_TIMING, "--data-only", "--data-sizes", "64,256", "--folder-sizes",
                  "40,80", "--encode-items", "32", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    report = json.loads(out.read_text())["data"]
    assert report["latent_shape"] == [2, 8, 8] and list(report["sizes"]) == ["64", "256"]
    for layouts in report["sizes"].values():
        for r in layouts.values():
            assert r["peak_rss_mib"] > 0 and r["time_to_first_step_s"] > 0 and r["images_per_s"] > 0
    assert report["sizes"]["256"]["shards"]["items"] == 256
    folders = report["image_folders"]
    assert list(folders) == ["40", "80"] and folders["80"]["items"] == 80
    assert all(0 < r["load_data_s"] < r["time_to_first_step_s"] and r["peak_rss_mib"] > 0 for r in folders.values())
    runs = report["encode"]["runs"]
    assert set(runs) == {"1_process_1_thread", "1_process_2_threads", "2_processes_1_thread"}
    assert all(r["images"] == 32 and r["images_per_s"] > 0 for r in runs.values())
    assert runs["2_processes_1_thread"]["same_bytes_as_reference"]
    assert {t["goal"] for t in report["targets"]} == {"< 0.10", ">= 0.95", ">= 1.7x", "1 (yes)"}
    assert any(t["target"].startswith("time to the first step, image folder of 80") for t in report["targets"])
    printed = capsys.readouterr().out
    assert "| cached latents | layout | peak RSS, MiB |" in printed and "| 256 | in memory |" in printed
    assert "| image folder (PNGs) |" in printed
    assert report["encode"]["free_cores_before_each_round"] == [2.0]  # one round (TINY_TIMING)


def test_the_baseline_loop_trains():
    """diffusers' example loop, as the benchmark runs it: the weights move and EMA follows."""
    torch.manual_seed(0)
    dataset = InMemoryDataset(torch.randint(0, 256, (32, 1, 8, 8), dtype=torch.uint8),
                              torch.zeros(32, dtype=torch.long))
    unet = {"sample_size": 8, "in_channels": 1, "out_channels": 1, "block_out_channels": (8, 16),
            "norm_num_groups": 8, "layers_per_block": 1, "down_block_types": ("DownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "UpBlock2D")}
    accelerator = Accelerator(cpu=True)
    out = baseline_loop(accelerator, unet, dataset, 8, TrainingConfig(learning_rate=1e-3, ema_decay=0.9),
                        num_windows=3, steps=2)
    assert len(out["windows"]) == 3 and all(w > 0 for w in out["windows"])
    assert len(out["losses"]) == 6 and all(torch.isfinite(torch.tensor(out["losses"])))
    assert out["parameter_change_l1"] > 0


def test_flop_counts_match_a_hand_count():
    batch, cin, cout, size, k = 4, 3, 8, 10, 3
    conv = torch.nn.Conv2d(cin, cout, k, padding=1)
    x = torch.randn(batch, cin, size, size)
    flops, _ = count_flops(lambda: conv(x))
    assert flops == 2 * batch * cout * size * size * cin * k * k  # a multiply-add is 2
    linear = torch.nn.Linear(16, 32)
    flops, _ = count_flops(lambda: linear(torch.randn(5, 16)))
    assert flops == 2 * 5 * 16 * 32
    # The CPU attention kernel is counted too: QK^T and AV, 2 * 2 * B * H * L * S * E.
    q, key, v = (torch.randn(2, 4, 16, 8) for _ in range(3))
    flops, per_op = count_flops(lambda: F.scaled_dot_product_attention(q, key, v))
    assert flops == 4 * 2 * 4 * 16 * 16 * 8
    # Backward of a conv: the input and weight gradients, twice the forward.
    x.requires_grad_(True)
    flops, _ = count_flops(lambda: conv(x).sum().backward())
    assert flops == 3 * 2 * batch * cout * size * size * cin * k * k


def test_the_matmul_peak_is_positive_and_precisions_resolve():
    peak = matmul_peak(torch.device("cpu"), sizes=(128,), repeats=2)
    assert peak["flop_per_s"] > 0
    assert cli.resolve_precisions("auto", cpu=True) == ["fp32", "bf16"]
    assert cli.resolve_precisions("bf16,fp32", cpu=True) == ["bf16", "fp32"]
    with pytest.raises(ValueError, match="--precision"):
        cli.resolve_precisions("fp8", cpu=True)
