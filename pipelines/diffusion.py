"""Sampling from a trained noise predictor, and the exported pipeline.

The sampler is chosen at sample time by swapping the scheduler (diffusers' idiom): the network
predicts eps, the scheduler steps; the same weights serve every sampler.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, DiffusionPipeline,
                       DPMSolverMultistepScheduler, ImagePipelineOutput, UNet2DModel)
from PIL import Image
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from ..modules.ddpm import class_count
from ..modules.sr import resize


class ClippedDDIMScheduler(DDIMScheduler):
    """DDIM stepping with the eps of its clipped x_0 estimate (diffusers' `use_clipped_model_output`).

    With `clip_sample`, stock DDIM steps with the clipped x_0 but the unclipped eps, a pair that
    no point of the forward process has; where x_0 estimates leave [-1, 1] by far, as under
    classifier-free guidance, that pair drives samples away from the data. Measured on the
    two-class 8x8 model of tests/test_class_conditional.py (v-prediction, 10 steps, 32 samples
    of each class, kernel sets default/avx2/avx512): samples of the requested class at w = 3,
    33/36/33 of 64 (chance) with the stock step, 64 of 64 with this one; at w = 1 64 of 64 with
    both. Without clipping (latents) the two steps are the same.
    """

    def step(self, *args, **kwargs):
        return super().step(*args, **kwargs, use_clipped_model_output=True)


SAMPLERS = {
    "ddpm": DDPMScheduler,  # the seed's ancestral sampler, all T steps
    "ddim": ClippedDDIMScheduler,
    "dpmsolver": DPMSolverMultistepScheduler,  # DPM-Solver++ (2M), its SDE form (make_sampler)
    "dpmsolver-ode": DPMSolverMultistepScheduler,  # DPM-Solver++ (2M), deterministic
}


DEFAULT_SAMPLER = "dpmsolver"
DEFAULT_STEPS = 20


def sampler_and_steps(sampler: str | None, steps: int | None) -> tuple[str, int | None]:
    """The sampler defaults, for every command and stage: DPM-Solver++ in 20 steps; the seed's
    ancestral `ddpm` sampler runs all T training steps (None) unless `steps` says otherwise."""
    sampler = sampler or DEFAULT_SAMPLER
    return sampler, steps if steps is not None or sampler == "ddpm" else DEFAULT_STEPS


def make_sampler(name: str, train_scheduler_config) -> DDPMScheduler:
    """A sampling scheduler with the training schedule's betas and its x_0 clipping: DDPM and DDIM
    read `clip_sample`; DPM-Solver++ has none, but its thresholding with `sample_max_value` 1 (the
    default range) is exactly the clamp of x_0 to [-1, 1].

    "dpmsolver" is DPM-Solver++(2M) in its SDE form (`algorithm_type="sde-dpmsolver++"`: fresh
    noise at each step, as in the ancestral sampler). The deterministic form, like DDIM, follows
    the probability-flow ODE, where the demo's latent DDPM is worse at any step count: Frechet
    distance 5.9 at 20 steps (mean of 3 seeds, 500 samples each) and 6.3 at 100, against 2.1 for
    the ancestral sampler over all 1,000 steps (6 seeds) and 2.6 for the SDE form at 20 steps
    (the same 6 seeds). Samples remain a function of the generator's seed. "dpmsolver-ode" is the
    deterministic form (the super-resolution table in the README was measured with it)."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler {name!r} is not known; choose one of {', '.join(SAMPLERS)}")
    options = {"algorithm_type": "sde-dpmsolver++"} if name == "dpmsolver" else {}
    # The training schedule's timestep spacing, named: a fresh scheduler marks it as a default, so
    # from_config would give DPM-Solver its own ("linspace"), while the same schedule reloaded from
    # a stage folder names it ("leading"): training-time evaluation and `stagediff sample` would
    # then step through other timesteps.
    options["timestep_spacing"] = train_scheduler_config.get("timestep_spacing", "leading")
    if SAMPLERS[name] is DPMSolverMultistepScheduler and train_scheduler_config.get("clip_sample"):
        options.update(thresholding=True, sample_max_value=train_scheduler_config.get("clip_sample_range", 1.0))
    return SAMPLERS[name].from_config(train_scheduler_config, **options)


@dataclass(frozen=True)
class Tiling:
    """Overlapping square tiles of a canvas (a UNet's input: latents or pixels), in canvas units.

    `tiled` runs a network on the tiles and blends their outputs with a separable ramp window:
    1 inside a tile, falling linearly over the `overlap` next to each edge, positive everywhere,
    and normalised by the sum of the windows at each pixel. Where two tiles overlap by `overlap`
    the windows sum to 1 and the output cross-fades linearly from one tile's output to the
    other's, so tiles whose outputs differ (zero padding at a tile's edge, GroupNorm statistics
    taken over the tile) leave a ramp, not a step.

    Args:
        size: a tile's side (a tile is cut to the canvas where the canvas is smaller).
        overlap: the least overlap of neighbouring tiles, the length of the cross-fade; 0 gives
            abutting tiles pasted side by side (a naive tiling, with seams).
        multiple: tile starts are multiples of this, so that every tile sits on the UNet's
            downsampling grid (2 ** levels) as it would inside the whole canvas.
        batch_size: tiles per network call; memory is bounded by this many tiles.
    """

    size: int
    overlap: int
    multiple: int = 1
    batch_size: int = 16

    def __post_init__(self):
        if not 0 <= self.overlap < self.size or self.multiple < 1 or self.batch_size < 1:
            raise ValueError(f"tiling: overlap {self.overlap}, size {self.size}, multiple {self.multiple} and batch "
                             f"size {self.batch_size} must satisfy 0 <= overlap < size, multiple >= 1, batch size >= 1")

    def starts(self, length: int) -> list[int]:
        """Tile starts along a side of `length`: every stride, then one tile flush with the end."""
        if length <= self.size:
            return [0]
        stride = max(self.multiple, (self.size - self.overlap) // self.multiple * self.multiple)
        return list(range(0, length - self.size, stride)) + [length - self.size]

    def window(self, length: int, factor: int = 1) -> torch.Tensor:
        """(length * factor,) the blend weight along one side of a tile `length` canvas units long,
        whose output is `factor` times larger (a VAE decoder's)."""
        position = torch.arange(length * factor, dtype=torch.float32) + 0.5  # pixel centres
        distance = torch.minimum(position, length * factor - position)  # to the nearer edge, >= 0.5
        return (distance / (self.overlap * factor)).clamp(max=1) if self.overlap else torch.ones_like(position)


def tiled(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tiling: Tiling | None,
          factor: int = 1) -> torch.Tensor:
    """fn(x) evaluated on overlapping tiles of x and blended (see `Tiling`); fn(x) itself when
    `tiling` is None. fn maps (N, C, h, w) to (N, C', h * factor, w * factor) float32.

    Output = sum_i w_i * fn(tile_i) / sum_i w_i at every pixel, w_i the tile's window placed at
    its offset. When one tile covers the canvas the weights cancel and fn runs on x as it is, so
    tiling a canvas smaller than a tile changes nothing (bit for bit).
    """
    if tiling is None:
        return fn(x)
    height, width = x.shape[-2:]
    corners = [(i, j) for i in tiling.starts(height) for j in tiling.starts(width)]
    if len(corners) == 1:
        return torch.cat([fn(chunk) for chunk in x.split(tiling.batch_size)])
    tile_h, tile_w = min(tiling.size, height), min(tiling.size, width)
    weight = (tiling.window(tile_h, factor)[:, None] * tiling.window(tile_w, factor)).to(x.device)  # (h*f, w*f)
    out = total = None
    corners_per_call = max(1, tiling.batch_size // len(x))  # each corner gives one tile per image of x
    for first in range(0, len(corners), corners_per_call):
        group = corners[first: first + corners_per_call]
        tiles = torch.cat([x[..., i: i + tile_h, j: j + tile_w] for i, j in group])  # (len(group) * B, C, h, w)
        outputs = torch.cat([fn(chunk) for chunk in tiles.split(tiling.batch_size)])
        if out is None:
            out = outputs.new_zeros(len(x), outputs.shape[1], height * factor, width * factor)
            total = torch.zeros_like(out[0, 0])
        for (i, j), y in zip(group, outputs.split(len(x))):
            where = (slice(i * factor, (i + tile_h) * factor), slice(j * factor, (j + tile_w) * factor))
            out[(..., *where)] += y * weight
            total[where] += weight
    return out / total


@torch.no_grad()
def denoise(network, scheduler, shape: tuple[int, ...], num_inference_steps: int | None,
            generator: torch.Generator | list[torch.Generator] | None, device: torch.device, progress: bool = False,
            condition: torch.Tensor | None = None, tiling: Tiling | None = None,
            class_labels: torch.Tensor | None = None, guidance_scale: float = 1.0) -> torch.Tensor:
    """z_T ~ N(0, I), then for each timestep: eps = eps_theta(z_t, t); z_{t-1} = scheduler.step(...).

    A conditional network sees eps_theta([z_t, condition], t) (channel concatenation). A class-
    conditional one sees the (B,) `class_labels` c, guided with `guidance_scale` (see `guided`).
    A list of generators (diffusers' convention) gives each sample its own noise stream, so a
    sample does not depend on the batch it is drawn in. With `tiling` (unlabelled networks only),
    eps_theta is evaluated on overlapping tiles and blended at every step (MultiDiffusion, Bar-Tal
    et al. 2023, whose step is the per-pixel weighted average of the tiles' steps; a sampler's step
    is affine in eps with the same coefficients at every pixel, so blending eps and stepping once
    is that average), and the scheduler steps the whole canvas with one noise draw: the tiles
    cannot drift apart.
    """
    steps = num_inference_steps or scheduler.config.num_train_timesteps
    scheduler.set_timesteps(steps, device=device)
    z = randn_tensor(shape, generator=generator, device=torch.device(device), dtype=torch.float32)
    z = z * scheduler.init_noise_sigma
    eps_theta = guided(network, class_labels, guidance_scale)
    for t in tqdm(scheduler.timesteps, disable=not progress, leave=False, desc="sampling"):
        network_input = z if condition is None else torch.cat([z, condition.to(z.dtype)], 1)
        eps = tiled(lambda tile, t=t: eps_theta(tile, t), network_input, tiling)
        z = scheduler.step(eps, t, z, generator=generator).prev_sample
    return z


def guided(network, class_labels: torch.Tensor | None = None,
           guidance_scale: float = 1.0) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """(z_t, t) -> the network's float32 prediction for class labels c, with classifier-free
    guidance (Ho & Salimans 2022, eq. 6, in diffusers' convention w = 1 + their w):

        eps~(z_t, c) = eps(z_t, null) + w (eps(z_t, c) - eps(z_t, null)),

    null the network's null class (index K, `class_count`), w = `guidance_scale`. w = 1 is the
    conditional model alone: one network call of batch B; any other w is one call of batch 2B,
    [z_t; z_t] with labels [c; null]. The same combination guides a v-prediction: for given z_t
    and t, v = (eps - sqrt(1 - abar_t) z_t) / sqrt(abar_t) is affine in eps and the weights
    (1 - w, w) sum to 1 (diffusers guides the model output alike). Without labels: eps(z_t).
    """
    dtype = next(network.parameters()).dtype
    if class_labels is None:
        return lambda z, t: network(z.to(dtype), t).sample.float()
    if guidance_scale == 1:
        return lambda z, t: network(z.to(dtype), t, class_labels=class_labels).sample.float()
    labels = torch.cat([class_labels, torch.full_like(class_labels, class_count(network.config))])  # [c; null]

    def eps_guided(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps_c, eps_null = network(torch.cat([z, z]).to(dtype), t, class_labels=labels).sample.float().chunk(2)
        return eps_null + guidance_scale * (eps_c - eps_null)

    return eps_guided


def class_labels_for(num_classes: int | None, num_samples: int, class_labels=None, guidance_scale: float = 1.0,
                     device: torch.device | str = "cpu") -> torch.Tensor | None:
    """The (num_samples,) labels to sample a model of `num_classes` classes with (None for an
    unconditional model): `class_labels` an int (every sample of that class) or one label per
    sample; by default balanced classes, sample i of class i mod K. A ValueError names what is
    wrong: labels outside 0..K-1 (naming K), the wrong count, labels or guidance for an
    unconditional model."""
    if num_classes is None:
        if class_labels is not None or guidance_scale != 1:
            raise ValueError(f"class_labels={class_labels!r}, guidance_scale={guidance_scale!r} (stagediff sample "
                             "--class, --guidance-scale): labels and guidance need a class-conditional model; this "
                             "one is unconditional (trained without model.class_conditional: true)")
        return None
    if class_labels is None:
        return torch.arange(num_samples, device=device) % num_classes
    labels = torch.as_tensor(class_labels, dtype=torch.long, device=device)
    labels = labels.expand(num_samples) if labels.dim() == 0 else labels
    if labels.shape != (num_samples,):
        raise ValueError(f"class_labels: {len(labels)} labels for {num_samples} samples; give one label per "
                         "sample, or one int for all of them")
    outside = labels[(labels < 0) | (labels >= num_classes)]
    if len(outside):
        raise ValueError(f"class label(s) {sorted(set(outside.tolist()))} outside 0..{num_classes - 1}: the model "
                         f"has K = {num_classes} classes")
    return labels


def downsampling_factor(vae: AutoencoderKL | None) -> int:
    """Pixels per latent along a side (1 without a VAE)."""
    return 1 if vae is None else 2 ** (len(vae.config.block_out_channels) - 1)


def checked_tile_overlap(tile_size: int, tile_overlap: int | None) -> int:
    """The overlap of tiles `tile_size` input px a side: `tile_overlap`, by default a quarter of the tile."""
    overlap = tile_size // 4 if tile_overlap is None else tile_overlap
    if not 0 <= overlap < tile_size:
        raise ValueError(f"tile size {tile_size} and tile overlap {overlap} (input px) must satisfy "
                         f"0 <= overlap < tile size")
    return overlap


def canvas_tiling(unet: UNet2DModel, vae: AutoencoderKL | None, scale: int, tile_size: int | None,
                  tile_overlap: int | None = None, batch_size: int = 16) -> Tiling | None:
    """`tile_size` and `tile_overlap` in input pixels (Real-ESRGAN's --tile and --tile_pad) -> the
    tiling of the UNet's canvas, `scale / factor` canvas units per input pixel; None (no tiling)
    for tile_size None. The tile is rounded down to the UNet's multiple, the overlap up; the
    overlap defaults to a quarter of the tile."""
    if tile_size is None:
        return None
    tile_overlap = checked_tile_overlap(tile_size, tile_overlap)
    multiple = 2 ** (len(unet.config.block_out_channels) - 1)
    per_pixel = scale / downsampling_factor(vae)  # canvas units per input pixel
    size = max(multiple, int(tile_size * per_pixel) // multiple * multiple)
    return Tiling(size, min(size - 1, math.ceil(tile_overlap * per_pixel)), multiple, batch_size)


@torch.no_grad()
def super_resolve(unet: UNet2DModel, scheduler, low_res: torch.Tensor, scale: int, objective: str = "diffusion",
                  vae: AutoencoderKL | None = None, num_inference_steps: int | None = 20,
                  generator: torch.Generator | list[torch.Generator] | None = None,
                  progress: bool = False, tiling: Tiling | None = None, residual: bool = False,
                  residual_scale: float = 1.0) -> torch.Tensor:
    """(B, C, h, w) low-resolution images in [-1, 1] -> (B, C, h * scale, w * scale) in [-1, 1].

    The condition is the input resized (bicubic) to the space the UNet works in: the output's
    size in pixel space (SR3), the latent's size with a VAE (latent diffusion's SR model).
    `objective` "diffusion" samples from p(X | Y); "regression" is the L2 regressor's E[X | Y].
    `residual` (pixel space): the UNet's output, divided by `residual_scale`, is the detail added
    to the upsampled input.
    `tiling` (in canvas units, see `canvas_tiling`) runs the UNet, and the VAE's decoder, on
    overlapping tiles, so memory is bounded by the tile size, not the image's.
    """
    height, width = low_res.shape[-2] * scale, low_res.shape[-1] * scale
    factor = downsampling_factor(vae)
    if height % factor or width % factor:
        raise ValueError(f"output size {height}x{width} is not divisible by the VAE's downsampling factor {factor}")
    condition = resize(low_res.float(), (height // factor, width // factor)).to(unet.device)
    if objective == "regression":
        x = tiled(lambda tile: unet(tile.to(unet.dtype), 0).sample.float(), condition, tiling)
    else:
        target_channels = unet.config.out_channels
        shape = (len(low_res), target_channels, height // factor, width // factor)
        x = denoise(unet, scheduler, shape, num_inference_steps, generator, unet.device, progress, condition, tiling)
    if residual:
        x = condition + x / residual_scale
    if vae is not None:
        # The decoder runs on the UNet's latent tiles, blended the same way in pixel space, rather
        # than through diffusers' `vae.enable_tiling()`: that one takes its tile from the VAE's
        # config.sample_size, the training resolution (16-64 px in our configs: 8-16 latents; it
        # raises on a zero stride below 2), not from --tile, and decodes tiles one at a time (2x
        # slower than one call on a 64x96 latent with a 2-level test VAE, measured).
        x = tiled(lambda z: vae.decode((z / vae.config.scaling_factor).to(vae.dtype)).sample.float(), x, tiling,
                  factor)
    return x.clamp(-1, 1)


def fold_scaling_factor(vae: AutoencoderKL) -> AutoencoderKL:
    """A copy of `vae` that decodes scaled latents z * s directly, with scaling_factor 1.

    Its first decoder layer (the 1x1 post_quant_conv) absorbs 1/s: stock pipelines that decode
    latents without a scaling factor (diffusers' LDMSuperResolutionPipeline) then see the same
    images as ours. Encoding with the copy gives unscaled latents, so it is for decoding only.
    """
    if not vae.config.use_post_quant_conv:
        raise ValueError("this VAE has no post_quant_conv to fold its scaling_factor into")
    folded = AutoencoderKL.from_config({**vae.config, "scaling_factor": 1.0})
    state = vae.state_dict()
    state["post_quant_conv.weight"] = state["post_quant_conv.weight"] / vae.config.scaling_factor
    folded.load_state_dict(state)
    return folded.to(vae.device).eval()


class ImageDiffusionPipeline(DiffusionPipeline):
    """A UNet denoises images, optionally of chosen classes with classifier-free guidance.

    Stock `DDPMPipeline` takes no class labels: class-conditional pixel stages export this one
    (unconditional pixel stages still export the stock class); its components are stock
    diffusers classes. A class-conditional UNet records its classes in its config:
    `num_class_embeds` = K + 1, the last index K being the null class (`class_count`).

    Args:
        unet: a `UNet2DModel` noise predictor (with `num_class_embeds` when class-conditional).
        scheduler: the training schedule's scheduler; any diffusers sampler can replace it.
    """

    def __init__(self, unet: UNet2DModel, scheduler: DDPMScheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @property
    def num_classes(self) -> int | None:
        """K for a class-conditional UNet (labels 0..K-1), None for an unconditional one."""
        return class_count(self.unet.config)

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, num_inference_steps: int | None = 20,
                 generator: torch.Generator | list[torch.Generator] | None = None, output_type: str = "pil",
                 return_dict: bool = True, class_labels: int | list[int] | torch.Tensor | None = None,
                 guidance_scale: float = 1.0):
        """`class_labels` (class-conditional models): an int for `batch_size` images of that class,
        or one label per image; default: balanced classes (image i of class i mod K).
        `guidance_scale` w: classifier-free guidance (`guided`); 1 is the conditional model alone."""
        labels = class_labels_for(self.num_classes, batch_size, class_labels, guidance_scale, self.device)
        cfg = self.unet.config
        shape = (batch_size, cfg.in_channels, cfg.sample_size, cfg.sample_size)
        z = denoise(self.unet, self.scheduler, shape, num_inference_steps, generator, self.device, progress=True,
                    class_labels=labels, guidance_scale=guidance_scale)
        images = self.decode(z).float().clamp(-1, 1)
        if output_type != "pt":
            images = (images + 1) / 2
            images = self.numpy_to_pil(images.permute(0, 2, 3, 1).cpu().numpy())
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """What the UNet samples -> images (pixels: as they are)."""
        return z


class LatentDiffusionPipeline(ImageDiffusionPipeline):
    """Latent diffusion: a UNet denoises VAE latents (optionally of chosen classes, with
    classifier-free guidance: see `ImageDiffusionPipeline`), the VAE decodes them.

    Every component is a stock diffusers class (`AutoencoderKL`, `UNet2DModel`, a scheduler), so
    each subfolder of a saved pipeline loads on its own with diffusers; the latent scale is the
    VAE's `config.scaling_factor`. Args: vae, unet, scheduler.
    """

    def __init__(self, vae: AutoencoderKL, unet: UNet2DModel, scheduler: DDPMScheduler):
        DiffusionPipeline.__init__(self)
        self.register_modules(vae=vae, unet=unet, scheduler=scheduler)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode((latents / self.vae.config.scaling_factor).to(self.vae.dtype)).sample


def pil_to_model_range(image: Image.Image) -> torch.Tensor:
    """A PIL image (any band count) -> (1, bands, H, W) float32 in [-1, 1] (k / 127.5 - 1)."""
    bands = len(image.getbands())
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).reshape(image.height, image.width, bands))
    return pixels.permute(2, 0, 1)[None] / 127.5 - 1


class SuperResolutionPipeline(DiffusionPipeline):
    """Image-to-image super-resolution (the seed's p(X | Y)): a UNet conditioned on the low-resolution
    image, in pixel space (SR3) or in a VAE's latent space (latent diffusion's SR model).

    Components follow diffusers' `LDMSuperResolutionPipeline` (`vqvae`, `unet`, `scheduler`; the
    low-resolution image concatenated after the latents; no latent scaling at decode time: the
    exported VAE has its scaling factor folded in), so where the latent layout matches (latent
    channels = image channels, latent size = input size) that stock pipeline loads the same folder.

    Args:
        unet: a `UNet2DModel` with out_channels target channels and in_channels target + image
            channels (diffusion), or image channels (regression).
        scheduler: the training schedule's scheduler; any diffusers sampler can replace it.
        vqvae: the decoder for latent models (an `AutoencoderKL`), None in pixel space.
        scale: the upscaling factor.
        objective: "diffusion" (sampling) or "regression" (the L2 baseline: one forward pass).
        residual: pixel space only: the output is the UNet's (or the sample's), divided by
            `residual_scale`, plus the bicubic-upsampled input.
    """

    _optional_components = ["vqvae"]

    def __init__(self, unet: UNet2DModel, scheduler: DDPMScheduler, vqvae: AutoencoderKL | None = None,
                 scale: int = 4, objective: str = "diffusion", residual: bool = False, residual_scale: float = 1.0):
        super().__init__()
        self.register_modules(vqvae=vqvae, unet=unet, scheduler=scheduler)
        self.register_to_config(scale=scale, objective=objective, residual=residual, residual_scale=residual_scale)

    @property
    def image_channels(self) -> int:
        cfg = self.unet.config
        return cfg.in_channels if self.config.objective == "regression" else cfg.in_channels - cfg.out_channels

    @torch.no_grad()
    def __call__(self, image: torch.Tensor | Image.Image, num_inference_steps: int | None = 20,
                 generator: torch.Generator | list[torch.Generator] | None = None, output_type: str = "pil",
                 return_dict: bool = True, tile_size: int | None = None, tile_overlap: int | None = None,
                 tile_batch_size: int = 16):
        """`image`: a PIL image, or a (B, C, h, w) tensor in [-1, 1]; returns images `scale` times larger.

        `tile_size` (input pixels; None: the whole image at once) runs the UNet (and a latent
        model's decoder) on tiles of that many input pixels a side, overlapping by `tile_overlap`
        (default a quarter of the tile), `tile_batch_size` tiles per call, blended at every step:
        memory then depends on the tile size, not the image's. A side no longer than the tile is
        not cut.
        """
        if isinstance(image, Image.Image):
            image = pil_to_model_range(image.convert("L" if self.image_channels == 1 else "RGB"))
        progress = not getattr(self, "_progress_bar_config", {}).get("disable", False)
        tiling = canvas_tiling(self.unet, self.vqvae, self.config.scale, tile_size, tile_overlap, tile_batch_size)
        images = super_resolve(self.unet, self.scheduler, image.to(self.device), self.config.scale,
                               self.config.objective, self.vqvae, num_inference_steps, generator, progress, tiling,
                               self.config.residual, self.config.residual_scale)
        if output_type != "pt":
            images = self.numpy_to_pil(((images + 1) / 2).permute(0, 2, 3, 1).cpu().numpy())
        return ImagePipelineOutput(images=images) if return_dict else (images,)
