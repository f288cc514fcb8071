"""Super-resolution: the degradation, the conditional losses, the sr stage in pixel and latent space,
its exported pipeline (also loaded by stock diffusers), `stagediff super-resolve` and `evaluate --task sr`."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DModel
from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion_superresolution import (
    LDMSuperResolutionPipeline)
from PIL import Image
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from stagediff.modules.ddpm import EpsilonPredictionLoss
from stagediff.modules.metrics import psnr, ssim
from stagediff.modules.sr import RegressionLoss, downsample, gaussian_blur, resize
from stagediff.pipelines.cli import main
from stagediff.pipelines.config import ConfigError
from stagediff.pipelines.registry import load_config, parse_run_config
from stagediff.pipelines.data import load_data
from stagediff.pipelines.diffusion import SuperResolutionPipeline, denoise, fold_scaling_factor, super_resolve
from stagediff.pipelines.hub import build_upload_folder
from stagediff.pipelines.run import run
from stagediff.pipelines.stages.sr import SRStage

from helpers import tiny_vae_config
from reliability.helpers import huge_png, train

TINY_UNET = {"block_out_channels": [8, 16], "attention": [False, True], "norm_num_groups": 8,
             "num_train_timesteps": 100, "num_inference_steps": 5, "num_eval_samples": 16}
TRAINING = {"max_steps": 3, "batch_size": 16, "log_every": 1}


# ----------------------------------------------------------------------------- math


@pytest.mark.numerics
def test_downsample_is_bicubic_with_antialiasing_and_checks_divisibility():
    x = torch.rand(2, 3, 16, 12) * 2 - 1
    y = downsample(x, 4)
    assert y.shape == (2, 3, 4, 3) and y.min() >= -1 and y.max() <= 1
    assert torch.allclose(downsample(torch.full((1, 1, 8, 8), 0.3), 2), torch.tensor(0.3))
    # The same filter as PIL's BICUBIC resize, which antialiases when shrinking.
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(pixels).resize((8, 8), Image.Resampling.BICUBIC), dtype=np.float32)
    ours = downsample(torch.from_numpy(pixels).float()[None, None] / 127.5 - 1, 4)[0, 0]
    assert np.abs((ours.numpy() + 1) * 127.5 - expected).max() <= 1.0  # PIL rounds to uint8
    with pytest.raises(ValueError, match="10x12 is not divisible by the scale factor 4"):
        downsample(torch.zeros(1, 1, 10, 12), 4)


@pytest.mark.numerics
def test_blur_preserves_mass_and_smooths():
    x = torch.zeros(1, 1, 15, 15)
    x[..., 7, 7] = 1
    blurred = gaussian_blur(x, 1.0)
    assert blurred.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert blurred.max() < 0.2 and torch.equal(gaussian_blur(x, 0.0), x)


@pytest.mark.numerics
def test_psnr_and_ssim_match_torchmetrics():
    torch.manual_seed(0)
    a = torch.rand(4, 2, 24, 24, dtype=torch.float64) * 2 - 1
    b = (a + 0.2 * torch.randn_like(a)).clamp(-1, 1)
    expected_psnr = peak_signal_noise_ratio((b + 1) / 2, (a + 1) / 2, data_range=1.0, reduction="none",
                                            dim=(1, 2, 3))
    assert torch.allclose(psnr(b, a), expected_psnr.double())
    # torchmetrics averages over reflect-padded borders too; its full map cropped to the valid
    # windows is Wang et al.'s SSIM, which ours computes.
    _, full = structural_similarity_index_measure((b + 1) / 2, (a + 1) / 2, data_range=1.0, reduction="none",
                                                  return_full_image=True)
    assert torch.allclose(ssim(b, a), full[..., 5:-5, 5:-5].flatten(1).mean(1), atol=1e-6)
    assert torch.allclose(ssim(a, a), torch.ones(4, dtype=torch.float64))


class Recorder(torch.nn.Module):
    """A network that records its input and returns a fixed linear map of it."""

    def __init__(self, out_channels):
        super().__init__()
        self.out_channels = out_channels
        self.inputs = []

    def forward(self, sample, timestep):
        self.inputs.append((sample, timestep))
        return type("Output", (), {"sample": sample[:, : self.out_channels] * 0.5})()


@pytest.mark.numerics
def test_conditional_eps_loss_sees_the_noisy_target_beside_the_condition():
    scheduler = DDPMScheduler(num_train_timesteps=50)
    network = Recorder(out_channels=2)
    x0, y = torch.randn(3, 2, 4, 4), torch.randn(3, 1, 4, 4)
    torch.manual_seed(0)
    loss = EpsilonPredictionLoss(network, scheduler, condition_channels=1)(torch.cat([x0, y], 1))["loss"]
    torch.manual_seed(0)  # the same t and eps, drawn in the same order
    t = torch.randint(0, 50, (3,))
    eps = torch.randn(x0.shape)
    zt = scheduler.alphas_cumprod[t].sqrt()[:, None, None, None] * x0 + (
        1 - scheduler.alphas_cumprod[t]).sqrt()[:, None, None, None] * eps
    seen, seen_t = network.inputs[0]
    assert torch.allclose(seen[:, :2], zt, atol=1e-6) and torch.equal(seen[:, 2:], y) and torch.equal(seen_t, t)
    assert loss.item() == pytest.approx((0.5 * zt - eps).pow(2).mean().item(), rel=1e-5)


@pytest.mark.numerics
def test_regression_loss_is_the_l2_error_of_g_of_y():
    network = Recorder(out_channels=1)
    x, y = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    loss = RegressionLoss(network, condition_channels=1)(torch.cat([x, y], 1))["loss"]
    assert torch.equal(network.inputs[0][0], y)
    assert loss.item() == pytest.approx((0.5 * y - x).pow(2).mean().item(), rel=1e-6)


def test_residual_diffusion_learns_the_scaled_detail_and_samples_add_it_back(tmp_path):
    """SRDiff's residual: the target is (x - bicubic_up(y)) * s, and a sample z becomes bicubic_up(y) + z / s."""
    raw = sr_run_config(tmp_path)
    raw["stages"] = [{"name": "residual_sr", "kind": "sr", "model": {**TINY_UNET, "scale": 4, "residual": True,
                                                                   "residual_scale": 4.0}, "training": TRAINING}]
    config = parse_run_config(raw)
    stage = SRStage(config.stages[0], load_data(config.data))
    x = torch.stack([stage.data.validation[i]["x"] for i in range(3)])
    upsampled = resize(downsample(x, 4), (16, 16))
    pair = stage.pair(x, train=False)
    assert torch.allclose(pair[:, :1], (x - upsampled) * 4, atol=1e-6) and torch.equal(pair[:, 1:], upsampled)

    model = stage.build_model()
    assert not model.scheduler.config.clip_sample  # a residual's scaled detail leaves [-1, 1]
    unet = model.network.eval()
    scheduler = DDIMScheduler(prediction_type="v_prediction")
    low_res = downsample(x, 4)
    out = super_resolve(unet, scheduler, low_res, 4, num_inference_steps=5, residual=True, residual_scale=4.0,
                        generator=torch.Generator().manual_seed(0))
    z = denoise(unet, scheduler, (3, 1, 16, 16), 5, torch.Generator().manual_seed(0), "cpu", condition=upsampled)
    assert torch.allclose(out, (upsampled + z / 4).clamp(-1, 1), atol=1e-6)


@pytest.mark.numerics
def test_folding_the_scaling_factor_decodes_scaled_latents_directly():
    vae = AutoencoderKL(in_channels=1, out_channels=1, latent_channels=2, block_out_channels=(8,),
                        norm_num_groups=8, scaling_factor=0.37).eval()
    z = torch.randn(2, 2, 4, 4)
    folded = fold_scaling_factor(vae)
    assert folded.config.scaling_factor == 1.0
    with torch.no_grad():
        assert torch.allclose(folded.decode(z * 0.37).sample, vae.decode(z).sample, atol=1e-5)


# ----------------------------------------------------------------------------- the stage


def sr_run_config(output_dir):
    raw = tiny_vae_config(output_dir)
    raw["stages"][0]["model"]["latent_channels"] = 1  # = image channels: the layout stock diffusers loads
    raw["stages"] += [
        # 16x16 -> 8x8x1 latents; x2 inputs are 8x8: latent diffusion's SR layout.
        {"name": "latent_sr", "kind": "sr", "input": "vae", "model": {**TINY_UNET, "scale": 2},
         "training": TRAINING},
        {"name": "regression", "kind": "sr", "model": {**TINY_UNET, "scale": 4, "objective": "regression",
                                                      "residual": True, "residual_scale": 2.0},
         "training": TRAINING},
        {"name": "pixel_sr", "kind": "sr", "model": {**TINY_UNET, "scale": 4, "blur_sigma": 0.5,
                                                    "condition_noise_std": 0.05}, "training": TRAINING},
    ]
    return raw


@pytest.fixture(scope="module")
def sr_run(tmp_path_factory):
    raw = sr_run_config(tmp_path_factory.mktemp("sr") / "run")
    return parse_run_config(raw), train(raw)


def test_sr_stages_train_and_report_fidelity(sr_run):
    config, results = sr_run
    for name in ("latent_sr", "regression", "pixel_sr"):
        metrics = results[name]
        assert {"val_loss", "psnr", "ssim", "consistency_psnr", "fd", "sampling_seconds_per_sample"} <= set(metrics)
        assert np.isfinite(metrics["val_loss"]) and 0 < metrics["psnr"] < 60
    unet = UNet2DModel.from_pretrained(f"{config.output_dir}/latent_sr/unet")
    assert (unet.config.in_channels, unet.config.out_channels, unet.config.sample_size) == (2, 1, 8)
    unet = UNet2DModel.from_pretrained(f"{config.output_dir}/pixel_sr/unet")
    assert (unet.config.in_channels, unet.config.out_channels, unet.config.sample_size) == (2, 1, 16)
    # Samplers clip x_0 estimates of pixels, never of latents.
    assert SuperResolutionPipeline.from_pretrained(f"{config.output_dir}/pixel_sr").scheduler.config.clip_sample
    assert not SuperResolutionPipeline.from_pretrained(f"{config.output_dir}/latent_sr").scheduler.config.clip_sample
    unet = UNet2DModel.from_pretrained(f"{config.output_dir}/regression/unet")
    assert (unet.config.in_channels, unet.config.out_channels) == (1, 1)
    # The residual regressor's folder says so: its pipeline adds the upsampled input to the UNet's
    # output divided by the residual's scale.
    pipeline = SuperResolutionPipeline.from_pretrained(f"{config.output_dir}/regression")
    assert pipeline.config.residual is True and pipeline.config.residual_scale == 2.0
    low_res = torch.rand(2, 1, 4, 4) * 2 - 1
    upsampled = resize(low_res, (16, 16))
    with torch.no_grad():
        expected = (upsampled + unet(upsampled, 0).sample / 2).clamp(-1, 1)
    assert torch.allclose(pipeline(low_res, output_type="pt").images, expected, atol=1e-6)


@pytest.mark.parametrize("stage, low_size, high_size", [("latent_sr", 8, 16), ("pixel_sr", 4, 16),
                                                        ("regression", 4, 16)])
def test_pipeline_shapes_ranges_and_seeds(sr_run, stage, low_size, high_size):
    config, _ = sr_run
    pipe = SuperResolutionPipeline.from_pretrained(f"{config.output_dir}/{stage}")
    low_res = torch.rand(3, 1, low_size, low_size) * 2 - 1
    a = pipe(low_res, num_inference_steps=3, generator=torch.Generator().manual_seed(1), output_type="pt").images
    b = pipe(low_res, num_inference_steps=3, generator=torch.Generator().manual_seed(1), output_type="pt").images
    assert a.shape == (3, 1, high_size, high_size) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b)  # same seed, same output
    c = pipe(low_res, num_inference_steps=3, generator=torch.Generator().manual_seed(2), output_type="pt").images
    assert torch.equal(a, c) == (stage == "regression")  # only the regressor is deterministic
    pil = pipe(Image.new("RGB", (low_size, low_size), (200, 10, 10)), num_inference_steps=2).images[0]
    assert pil.size == (high_size, high_size) and pil.mode == "L"


def test_latent_sr_folder_loads_in_stock_ldm_super_resolution_pipeline(sr_run):
    config, _ = sr_run
    folder = f"{config.output_dir}/latent_sr"
    ours = SuperResolutionPipeline.from_pretrained(folder)
    stock = LDMSuperResolutionPipeline.from_pretrained(folder)
    # DDIM with eta 0 is deterministic after z_T (the stock pipeline gives step() no generator).
    ours.scheduler = DDIMScheduler.from_config(ours.scheduler.config)
    stock.scheduler = DDIMScheduler.from_config(stock.scheduler.config)
    low_res = torch.rand(2, 1, 8, 8) * 2 - 1
    a = ours(low_res, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="pt").images
    b = stock(low_res, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert torch.allclose((a + 1) / 2, b, atol=1e-5)


def test_bad_sr_configs_name_the_key(tmp_path):
    raw = sr_run_config(tmp_path)
    raw["stages"] = raw["stages"][2:3]
    raw["stages"][0]["model"]["scale"] = 3
    with pytest.raises(ValueError, match=r"stages.regression.model.scale: 3 does not divide the data's resolution 16"):
        run(parse_run_config(raw))
    raw["stages"][0]["model"]["scale"] = 1
    with pytest.raises(ConfigError, match="scale: 1 is not valid"):
        parse_run_config(raw)
    raw["stages"][0]["model"]["scale"] = 2
    with pytest.raises(ConfigError, match="residual_scale: 4.0 scales the residual; it needs residual: true"):
        parse_run_config({**raw, "stages": [{**raw["stages"][0], "model": {**TINY_UNET, "residual_scale": 4.0}}]})
    latent = sr_run_config(tmp_path)
    latent["stages"][1]["model"].update(objective="regression", residual=True)
    with pytest.raises(ValueError, match=r"stages.latent_sr.model.residual: .* a latent model \(input: vae\)"):
        run(parse_run_config({**latent, "stages": latent["stages"][:2]}))
    raw["data"] = {"source": "toy", "toy": "ring8"}
    with pytest.raises(ValueError, match="needs image data, not vectors"):
        run(parse_run_config(raw))


# ----------------------------------------------------------------------------- command line


@pytest.fixture
def inputs(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "inputs"
    folder.mkdir()
    Image.fromarray(rng.integers(0, 255, (4, 4), dtype=np.uint8)).save(folder / "gray.png")
    Image.fromarray(rng.integers(0, 255, (5, 7, 3), dtype=np.uint8)).save(folder / "rgb.png")
    Image.fromarray(rng.integers(0, 255, (4, 4, 4), dtype=np.uint8)).save(folder / "rgba.png")
    Image.fromarray(rng.integers(0, 255, (1, 1), dtype=np.uint8)).save(folder / "dot.png")
    Image.fromarray(rng.integers(0, 255, (40, 20), dtype=np.uint8)).save(folder / "tall.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "bomb.png").write_bytes(huge_png(50_000, 50_000))  # a header announcing 2.5 gigapixels
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_super_resolve_handles_every_input_kind_and_names_bad_files(sr_run, inputs, tmp_path, capsys):
    config, _ = sr_run
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["super-resolve", str(inputs), "--model", f"{config.output_dir}/pixel_sr", "--out", str(out),
              "--num-samples", "2", "--steps", "2", "--max-input-side", "10"])
    assert exit_info.value.code == 1  # some inputs failed; the others were written
    printed = capsys.readouterr()
    assert f"{inputs / 'broken.png'}: not a readable image" in printed.out
    assert f"{inputs / 'dot.png'}: 1x1 px is too small" in printed.out
    assert f"{inputs / 'bomb.png'}: not a readable image (DecompressionBombError" in printed.out
    assert "tall.png is 20x40 px; resized to 5x10" in printed.out + printed.err
    sizes = {p.name: (Image.open(p).size, Image.open(p).mode) for p in out.iterdir()}
    assert sizes == {
        "gray_x4_0.png": ((16, 16), "L"), "gray_x4_1.png": ((16, 16), "L"),
        "rgb_x4_0.png": ((28, 20), "L"), "rgb_x4_1.png": ((28, 20), "L"),  # 7x5: padded, then cropped back
        "rgba_x4_0.png": ((16, 16), "LA"), "rgba_x4_1.png": ((16, 16), "LA"),  # alpha upscaled and kept
        "tall_x4_0.png": ((20, 40), "L"), "tall_x4_1.png": ((20, 40), "L"),
    }
    assert not np.array_equal(np.asarray(Image.open(out / "gray_x4_0.png")), np.asarray(Image.open(out / "gray_x4_1.png")))


def test_super_resolve_is_reproducible_and_independent_of_batching(sr_run, inputs, tmp_path):
    config, _ = sr_run
    model = f"{config.output_dir}/latent_sr"
    for name, batch in (("a", "4"), ("again", "4"), ("b", "1")):
        main(["super-resolve", str(inputs / "gray.png"), str(inputs / "r*.png"), "--model", model,
              "--out", str(tmp_path / name), "--num-samples", "3", "--batch-size", batch, "--steps", "2",
              "--scale", "2"])
    assert len(list((tmp_path / "a").iterdir())) == 9
    for path in (tmp_path / "a").iterdir():
        a, again, b = (np.asarray(Image.open(tmp_path / name / path.name), dtype=int) for name in ("a", "again", "b"))
        assert np.array_equal(a, again)  # the same seed, the same output
        assert np.abs(a - b).max() <= 2  # the same noise whatever the batching, up to float rounding


def test_super_resolve_errors_name_the_bad_value(sr_run, tmp_path, capsys):
    config, _ = sr_run
    model = f"{config.output_dir}/latent_sr"
    for argv, message in [
        ([str(tmp_path / "missing*.png"), "--model", model], "missing*.png: no such file"),
        ([str(tmp_path), "--model", model, "--scale", "4"], "--scale 4: the model"),
        ([str(tmp_path), "--model", str(tmp_path / "nowhere")], "nowhere"),
    ]:
        Image.new("L", (4, 4)).save(tmp_path / "x.png")
        with pytest.raises(SystemExit) as exit_info:
            main(["super-resolve", *argv, "--out", str(tmp_path / "out")])
        assert message in str(exit_info.value.code) + capsys.readouterr().err


def test_evaluate_sr_compares_bicubic_regression_and_samples(sr_run, tmp_path, capsys):
    config, _ = sr_run
    out = tmp_path / "evaluation"
    main(["evaluate", f"{config.output_dir}/pixel_sr", "--n", "12", "--num-samples", "3", "--steps", "2",
          "--out", str(out)])
    report = json.loads((out / "metrics.json").read_text())
    assert report["regression_dir"].endswith("regression")  # found in the same run
    results = report["results"]
    assert set(results) == {"bicubic", "regression", "sr"}
    for metrics in results.values():
        assert {"psnr", "ssim", "consistency_psnr", "fd", "classes_covered", "seconds_per_image"} <= set(metrics)
    assert results["sr"]["diversity"] > 0
    # Bicubic upsampling, downsampled again, gives back roughly its input (not exactly: the
    # antialiasing filter is not bicubic interpolation's inverse).
    assert results["bicubic"]["consistency_psnr"] > 25
    assert len(list((out / "figures").glob("example_*.png"))) == 8
    figure = Image.open(out / "figures" / "example_00.png")
    assert figure.size == (7 * (16 + 4), 16 + 4)  # input, bicubic, regression, 3 samples, truth (+ padding)
    assert "| bicubic |" in capsys.readouterr().out


@pytest.mark.slow
def test_documented_sr_config_is_faithful_to_its_inputs(tmp_path):
    """configs/mnist_sr.yaml's SR stage, its recipe on the embedded digits: its outputs, downsampled
    again, match the 8x8 inputs of 50 held-out digits to > 25 dB on average (ε-prediction: 13 dB
    after the whole training). To save suite time it trains 100 of the config's 1,000 steps
    (measured 28.8 dB under the avx2 and default kernel sets alike, 30.3 after 150, 31.3 after 200,
    37.7 after 1,000) and scores 50 of its 500 digits."""
    config = load_config(Path(__file__).parents[1] / "configs" / "mnist_sr.yaml",
                         [f"output_dir={tmp_path / 'run'}", "log_with=none", "stages.sr.model.num_eval_samples=50",
                          "stages.sr.training.max_steps=100"])
    config.stages = [stage for stage in config.stages if stage.model.objective == "diffusion"]
    metrics = run(config)["sr"]
    assert metrics["num_samples"] == 50
    assert metrics["consistency_psnr"] > 25


def test_sr_model_card_loads_the_uploaded_folder_with_its_own_snippet(sr_run, tmp_path):
    config, _ = sr_run
    folder = tmp_path / "upload"
    folder.mkdir()
    build_upload_folder(Path(config.output_dir) / "pixel_sr", "me/sr", folder)
    card = (folder / "README.md").read_text()
    assert "super-resolution" in card and "pipeline_tag: image-to-image" in card
    assert "from stagediff.pipelines.diffusion import SuperResolutionPipeline" in card
    pipe = SuperResolutionPipeline.from_pretrained(folder)
    assert pipe(torch.zeros(1, 1, 4, 4), num_inference_steps=2, output_type="pt").images.shape == (1, 1, 16, 16)
