"""Tiled super-resolution (`diffusion.Tiling`, `tiled`, `canvas_tiling`): exact where tiling cannot
change the result, within its tiles' own outputs where GroupNorm makes them differ, no seams, and
`stagediff super-resolve` on photos larger than a tile, in every colour mode.

The UNets are tiny and randomly initialised: each property here holds for any weights."""

import itertools

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DModel
from PIL import Image

from stagediff.modules.sr import resize
from stagediff.pipelines.cli import main
from stagediff.pipelines.diffusion import (SuperResolutionPipeline, Tiling, canvas_tiling, denoise, make_sampler,
                                           tiled)
from stagediff.pipelines.super_resolve import super_resolve_files

from helpers import generator

pytestmark = pytest.mark.usefixtures("single_thread")

SCALE = 4


def tiny_unet(in_channels: int, out_channels: int, seed: int = 0, attention=(False, True)) -> UNet2DModel:
    """Two levels, attention where `attention` says and in the middle block when it says so anywhere."""
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=16, in_channels=in_channels, out_channels=out_channels, block_out_channels=(8, 16),
                       layers_per_block=1, norm_num_groups=8, add_attention=any(attention),
                       down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention),
                       up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention))).eval()


def tiny_pipeline(objective: str, seed: int = 0, vae: AutoencoderKL | None = None,
                  **scheduler) -> SuperResolutionPipeline:
    """An RGB x4 model: a regressor, or a diffusion model with the CLI's default sampler."""
    channels = 3 if vae is None else vae.config.latent_channels
    unet = tiny_unet(3 if objective == "regression" else channels + 3, channels, seed)
    train_scheduler = DDPMScheduler(num_train_timesteps=100, **scheduler)
    pipe = SuperResolutionPipeline(unet, make_sampler("dpmsolver", train_scheduler.config), vae, SCALE, objective)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=3, block_out_channels=(8, 16),
                         norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2).eval()


def smooth_photo(batch: int, height: int, width: int) -> torch.Tensor:
    """(batch, 3, height, width) in [-1, 1]: noise at half the resolution, upsampled bicubically. A
    stationary field (the same statistics at every position), smooth at the scale of a few pixels
    like a photo, so that a seam stands out against it."""
    noise = torch.rand(batch, 3, height // 2, width // 2, generator=generator(0)) * 2 - 1
    return resize(noise, (height, width)).clamp(-1, 1)


def strip_norms(module: torch.nn.Module) -> torch.nn.Module:
    """The module with every GroupNorm replaced by the identity (in place)."""
    for name, child in module.named_children():
        setattr(module, name, torch.nn.Identity()) if isinstance(child, torch.nn.GroupNorm) else strip_norms(child)
    return module


def run(pipe: SuperResolutionPipeline, low_res: torch.Tensor, tile_size: int | None = None,
        tile_overlap: int | None = None) -> torch.Tensor:
    generators = [generator(k) for k in range(len(low_res))]
    return pipe(low_res, num_inference_steps=4, generator=generators, output_type="pt", tile_size=tile_size,
                tile_overlap=tile_overlap).images


# ----------------------------------------------------------------------------- exact cases


@pytest.mark.parametrize("objective, latent", [("regression", False), ("diffusion", False), ("diffusion", True)])
def test_a_tile_covering_the_image_is_the_untiled_computation(objective, latent):
    pipe = tiny_pipeline(objective, vae=tiny_vae() if latent else None)
    low_res = smooth_photo(2, 8, 12)
    # 12 input px: the whole canvas in one tile, so the blend weights cancel and fn runs on it as it is.
    assert torch.equal(run(pipe, low_res, tile_size=12), run(pipe, low_res))


@pytest.mark.numerics
def test_the_blend_of_a_pointwise_network_is_the_untiled_output():
    """A network whose output pixel depends only on its input pixel (a 1x1 convolution, then a
    nearest upsampling by `factor` as a VAE decoder's) gives the same value in every tile, so a
    correct blend (sum_i w_i y_i / sum_i w_i with y_i all equal) returns it up to float rounding,
    whatever the tiling; a tile placed at a wrong offset, or weights not normalised, would not."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 3, 1)
    x = torch.randn(3, 4, 40, 56)
    for factor in (1, 2):
        def pointwise(tile, factor=factor):
            return torch.nn.functional.interpolate(torch.tanh(conv(tile)), scale_factor=factor)
        expected = pointwise(x)
        for tiling in (Tiling(16, 4, 2, batch_size=2), Tiling(24, 8, 4, batch_size=16), Tiling(16, 0, 2)):
            with torch.no_grad():
                assert torch.allclose(tiled(pointwise, x, tiling, factor), expected, rtol=0, atol=1e-6)

    class Pointwise(torch.nn.Module):  # eps_theta([z_t, y], t), pixel by pixel
        def __init__(self):
            super().__init__()
            self.conv = conv

        def forward(self, sample, t):
            return type("Output", (), {"sample": torch.tanh(self.conv(sample)) * (t / 100)})()

    condition = torch.randn(2, 1, 40, 56)
    samples = [denoise(Pointwise(), DDPMScheduler(num_train_timesteps=100), (2, 3, 40, 56), 5,
                       [generator(0), generator(1)], torch.device("cpu"), condition=condition, tiling=tiling)
               for tiling in (None, Tiling(16, 4, 2, batch_size=3))]
    assert torch.allclose(samples[0], samples[1], rtol=0, atol=1e-5)


def test_tiles_sit_on_the_unet_grid_overlap_and_cover_the_canvas():
    tiling = Tiling(64, 16, 4)
    for length in (64, 100, 256, 388):
        starts = tiling.starts(length)
        assert starts[0] == 0 and starts[-1] == max(0, length - 64)  # the last tile is flush with the end
        assert all(s % 4 == 0 for s in starts[:-1])
        assert all(16 <= a + 64 - b < 64 for a, b in itertools.pairwise(starts))  # overlap >= 16, no repeats
    assert tiling.window(64).min() > 0 and tiling.window(64).max() == 1
    # Input px -> canvas units: x4 pixels (1 input px = 4 canvas px), x4 latents with a 4x VAE (1 = 1).
    unet = tiny_unet(6, 3)  # two levels: tiles are multiples of 2
    assert canvas_tiling(unet, None, 4, 64) == Tiling(256, 64, 2, 16)  # the overlap defaults to a quarter
    assert canvas_tiling(unet, None, 4, 65, 10, batch_size=3) == Tiling(260, 40, 2, 3)
    vae = AutoencoderKL(block_out_channels=(8, 8, 8), norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3)
    assert canvas_tiling(unet, vae, 4, 63, 16) == Tiling(62, 16, 2, 16)
    assert canvas_tiling(unet, None, 4, None) is None
    for size, overlap in ((16, 16), (16, -1), (0, None)):
        with pytest.raises(ValueError, match=f"tile size {size} and tile overlap"):
            canvas_tiling(unet, None, 4, size, overlap)


# ----------------------------------------------------------------------------- agreement with the untiled output


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    return ((output - reference).pow(2).mean() / reference.var()).sqrt().item()


@pytest.mark.numerics
@pytest.mark.parametrize("latent", [False, True])
def test_tiling_a_unet_without_norm_layers_changes_its_output_little(latent):
    """Without GroupNorm a tile differs from the whole image only within the receptive field of its
    edges (zero padding), where the window weighs it little. Measured (regressors, seeds 0-3,
    pixels): RMS error / output std 0.010-0.031 for tiles of 8 input px overlapping by 2; a naive
    tiling (overlap 0) 0.10-0.33; blends with weights not normalised, tiles 2 px off or
    transposed 0.22-0.82. Latents (seed 0, the decoder tiled too): 0.026, naive 0.13. 0.06 lies
    between, and the values agree to 1e-7 under ATEN_CPU_CAPABILITY default and avx2."""
    vae = strip_norms(tiny_vae()) if latent else None
    pipe = tiny_pipeline("regression", vae=vae)
    strip_norms(pipe.unet)
    low_res = smooth_photo(2, 32, 48)
    untiled = run(pipe, low_res)
    assert relative_error(run(pipe, low_res, 8, 2), untiled) < 0.06
    assert relative_error(run(pipe, low_res, 8, 0), untiled) > 0.06  # the tolerance tells a naive tiling apart


@pytest.mark.numerics
def test_tiled_output_lies_between_its_tiles_outputs():
    """With GroupNorm (statistics over the tile, not the image) a tile's output differs from the
    whole image's everywhere: for these random UNets by about as much as the output varies (PSNR
    tiled vs untiled 17.8-20.4 dB, tiles of 8 input px overlapping by 2, seeds 0-3; 20-22 dB for
    tiles of 16), and broken blends (weights not normalised, tiles 2 px off or transposed) are only
    0.3-4 dB worse, so no PSNR floor tells them apart. What a correct blend guarantees for any
    weights is that each pixel is a convex combination of the outputs of the tiles covering it:
    it lies between their least and greatest, and so is no farther from the untiled output than
    the farthest tile. The broken blends put 20-80% of pixels outside that range."""
    pipe = tiny_pipeline("regression")
    low_res = smooth_photo(1, 32, 48)
    untiled, blended = run(pipe, low_res), run(pipe, low_res, 8, 2)
    tiling = canvas_tiling(pipe.unet, None, SCALE, 8, 2)
    condition = resize(low_res, untiled.shape[-2:])
    least, greatest = torch.full_like(untiled, np.inf), torch.full_like(untiled, -np.inf)
    for i in tiling.starts(untiled.shape[-2]):
        for j in tiling.starts(untiled.shape[-1]):
            where = (..., slice(i, i + tiling.size), slice(j, j + tiling.size))
            with torch.no_grad():
                tile = pipe.unet(condition[where], 0).sample.clamp(-1, 1)
            least[where], greatest[where] = torch.minimum(least[where], tile), torch.maximum(greatest[where], tile)
    assert torch.all((blended >= least - 1e-5) & (blended <= greatest + 1e-5))
    farthest = torch.maximum((least - untiled).abs(), (greatest - untiled).abs())
    assert (blended - untiled).pow(2).mean() <= farthest.pow(2).mean()


# ----------------------------------------------------------------------------- seams


def seam_ratio(images: torch.Tensor, tiling: Tiling, period: int = SCALE) -> float:
    """Gradient energy (mean squared difference of neighbouring pixels) across tile borders over
    that inside tiles, the larger of the two axes. Borders are where a tile starts or ends; the
    inside positions compared with them are those at the same phase of the input's pixel grid
    (every `period` output px), since a bicubic upsampling's differences vary with that phase."""
    ratios = []
    for axis in (-1, -2):
        length = images.shape[axis]
        edges = {s for s in tiling.starts(length)} | {s + min(tiling.size, length) for s in tiling.starts(length)}
        borders = sorted(edges - {0, length})
        assert borders and all(p % period == 0 for p in borders)
        inside = [p for p in range(period, length, period) if p not in borders]
        energy = images.diff(dim=axis).pow(2).movedim(axis, 0).flatten(1).mean(1)  # [p - 1]: between p - 1 and p
        ratios.append(energy[[p - 1 for p in borders]].mean() / energy[[p - 1 for p in inside]].mean())
    return max(ratios).item()


@pytest.mark.numerics
@pytest.mark.parametrize("objective", ["regression", "diffusion"])
def test_blended_tiles_leave_no_seams(objective):
    """Measured over random UNets (seeds 0-5; 128x192 outputs, tiles of 8 input px): the ratio is
    0.77-1.32 on untiled outputs, which have no seams, so that is its spread by chance; 0.97-1.41
    with tiles overlapping by 2 and blended; 1.86-4.3 for naive tiles (overlap 0, each tile's
    output pasted as it is). 1.5 lies between.

    The diffusion model predicts x_0 with the weights that read z_t scaled by 0.1: a random
    eps-predictor's samples are noise, whose gradient energy would hide any seam, whereas this one
    gives smooth samples, as a trained model does; its UNet is still tiled at every step."""
    if objective == "regression":
        pipe = tiny_pipeline("regression")
    else:
        pipe = tiny_pipeline("diffusion", prediction_type="sample")
        with torch.no_grad():
            pipe.unet.conv_in.weight[:, :3] *= 0.1
    low_res = smooth_photo(2, 32, 48)
    assert seam_ratio(run(pipe, low_res, 8, 2), canvas_tiling(pipe.unet, None, SCALE, 8, 2)) < 1.5
    assert seam_ratio(run(pipe, low_res, 8, 0), canvas_tiling(pipe.unet, None, SCALE, 8, 0)) > 1.5  # naive: seams


# ----------------------------------------------------------------------------- the command


@pytest.fixture
def model_dir(tmp_path):
    """A saved RGB x4 pixel-space diffusion model without attention, whose cost on a whole 388x524
    canvas would be quadratic in its area (10 s a step)."""
    folder = tmp_path / "model"
    unet = tiny_unet(6, 3, attention=(False, False))
    SuperResolutionPipeline(unet, DDPMScheduler(num_train_timesteps=100), scale=SCALE).save_pretrained(folder)
    return folder


@pytest.fixture
def unet_inputs(monkeypatch):
    """The spatial sizes of every UNet call."""
    sizes = []
    forward = UNet2DModel.forward

    def recording(self, sample, *args, **kwargs):
        sizes.append(tuple(sample.shape[-2:]))
        return forward(self, sample, *args, **kwargs)

    monkeypatch.setattr(UNet2DModel, "forward", recording)
    return sizes


def test_super_resolve_tiles_a_photo_larger_than_a_tile(model_dir, unet_inputs, tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "inputs"
    folder.mkdir()
    Image.fromarray(rng.integers(0, 255, (97, 131, 3), dtype=np.uint8)).save(folder / "photo.png")
    main(["super-resolve", str(folder), "--model", str(model_dir), "--out", str(tmp_path / "out"), "--steps", "2"])
    with Image.open(tmp_path / "out" / "photo_x4.png") as image:
        assert (image.size, image.mode) == ((524, 388), "RGB")
    # The default tile, 64 input px = 256 output px, overlapping by 16 input px: 2 x 3 tiles a step.
    assert set(unet_inputs) == {(256, 256)} and len(unet_inputs) == 2  # 2 steps, 6 tiles per call
    unet_inputs.clear()
    main(["super-resolve", str(folder), "--model", str(model_dir), "--out", str(tmp_path / "whole"), "--steps", "2",
          "--tile", "0"])
    assert unet_inputs == [(388, 524)] * 2  # --tile 0: the whole canvas at once
    assert Image.open(tmp_path / "whole" / "photo_x4.png").size == (524, 388)


def test_gray_and_rgba_photos_become_the_models_rgb_and_keep_their_alpha(model_dir, tmp_path, capsys):
    rng = np.random.default_rng(0)
    folder = tmp_path / "inputs"
    folder.mkdir()
    Image.fromarray(rng.integers(0, 255, (70, 50), dtype=np.uint8)).save(folder / "gray.png")
    rgba = rng.integers(0, 255, (40, 90, 4), dtype=np.uint8)
    rgba[..., 3] = np.linspace(0, 255, 90, dtype=np.uint8)  # a horizontal alpha ramp
    Image.fromarray(rgba).save(folder / "rgba.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a JPEG")
    errors = super_resolve_files([str(folder)], str(model_dir), tmp_path / "out", steps=2, tile=32)
    assert len(errors) == 1 and errors[0].startswith(f"{folder / 'broken.jpg'}: not a readable image (")
    assert f"skipped: {errors[0]}" in capsys.readouterr().out
    outputs = {path.name: Image.open(path) for path in (tmp_path / "out").iterdir()}
    assert {name: (image.size, image.mode) for name, image in outputs.items()} == {
        "gray_x4.png": ((200, 280), "RGB"), "rgba_x4.png": ((360, 160), "RGBA")}
    alpha = np.asarray(outputs["rgba_x4.png"].getchannel("A"), dtype=float)
    expected = np.asarray(Image.fromarray(rgba[..., 3]).resize((360, 160), Image.Resampling.BICUBIC), dtype=float)
    assert np.abs(alpha - expected).max() <= 2  # the input's alpha, upscaled bicubically
