"""Sampling from a trained noise predictor, and the exported pipeline.

The sampler is chosen at sample time by swapping the scheduler (diffusers' idiom): the network
predicts eps, the scheduler steps; the same weights serve every sampler.
"""

from __future__ import annotations

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, DiffusionPipeline,
                       DPMSolverMultistepScheduler, ImagePipelineOutput, UNet2DModel)
from tqdm.auto import tqdm

SAMPLERS = {
    "ddpm": DDPMScheduler,  # the seed's ancestral sampler, all T steps
    "ddim": DDIMScheduler,
    "dpmsolver": DPMSolverMultistepScheduler,  # DPM-Solver++ (2M) by default
}


def make_sampler(name: str, train_scheduler_config) -> DDPMScheduler:
    """A sampling scheduler with the training schedule's betas."""
    try:
        return SAMPLERS[name].from_config(train_scheduler_config)
    except KeyError:
        raise ValueError(f"sampler {name!r} is not known; choose one of {', '.join(SAMPLERS)}") from None


@torch.no_grad()
def denoise(network, scheduler, shape: tuple[int, ...], num_inference_steps: int | None,
            generator: torch.Generator | None, device: torch.device, progress: bool = False) -> torch.Tensor:
    """z_T ~ N(0, I), then for each timestep: eps = eps_theta(z_t, t); z_{t-1} = scheduler.step(...)."""
    steps = num_inference_steps or scheduler.config.num_train_timesteps
    scheduler.set_timesteps(steps, device=device)
    z = torch.randn(shape, generator=generator, device=generator.device if generator else device).to(device)
    z = z * scheduler.init_noise_sigma
    dtype = next(network.parameters()).dtype
    for t in tqdm(scheduler.timesteps, disable=not progress, leave=False, desc="sampling"):
        eps = network(z.to(dtype), t).sample.float()
        z = scheduler.step(eps, t, z, generator=generator).prev_sample
    return z


class LatentDiffusionPipeline(DiffusionPipeline):
    """Unconditional latent diffusion: a UNet denoises VAE latents, the VAE decodes them.

    Every component is a stock diffusers class (`AutoencoderKL`, `UNet2DModel`, a scheduler), so
    each subfolder of a saved pipeline loads on its own with diffusers; the latent scale is the
    VAE's `config.scaling_factor`. Args: vae, unet, scheduler.
    """

    def __init__(self, vae: AutoencoderKL, unet: UNet2DModel, scheduler: DDPMScheduler):
        super().__init__()
        self.register_modules(vae=vae, unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, num_inference_steps: int | None = 20,
                 generator: torch.Generator | None = None, output_type: str = "pil",
                 return_dict: bool = True):
        cfg = self.unet.config
        shape = (batch_size, cfg.in_channels, cfg.sample_size, cfg.sample_size)
        latents = denoise(self.unet, self.scheduler, shape, num_inference_steps, generator, self.device,
                          progress=True)
        images = self.vae.decode((latents / self.vae.config.scaling_factor).to(self.vae.dtype)).sample
        images = images.float().clamp(-1, 1)
        if output_type != "pt":
            images = (images + 1) / 2
            images = self.numpy_to_pil(images.permute(0, 2, 3, 1).cpu().numpy())
        return ImagePipelineOutput(images=images) if return_dict else (images,)
