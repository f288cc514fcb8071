"""The GAN (seed part VI) as a stage: on pixels, 2D vectors or VAE latents.

Two named parameter groups, each with its optimizer and loss, stepped in the seed's order by the
one training loop: a discriminator step on L'(phi) = -ln(1 - d(f(z))) - ln d(x), then (every
`n_critic` steps) a generator step on the non-saturating -ln d(f(z)), each on its own
learning-rate schedule over its own optimizer steps. Exports `generator/` and `discriminator/`
(safetensors) and, on latents, a copy of the VAE in `vae/`. With `training.ema_decay` the EMA
averages the generator alone: samples come from the averaged generator, while validation
(`val_d_real`, `val_d_fake`) and the exported `discriminator/` use the discriminator as trained.

`class_conditional: true` learns p(x | class) of labelled images or latents: a generator f(z, c)
with a class embedding and a projection discriminator (Miyato & Koyama 2018; modules/gan.py),
K classes from the data, recorded in the exported generator's config (`num_classes`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from accelerate import Accelerator

from ...modules.gan import Discriminator, GANTrainingModule, Generator
from ..diffusion import class_labels_for
from .base import require_positive
from .spaces import DataSpaceStage, check_class_conditional, to_data_space


@dataclass
class GANModelConfig:
    """The `model:` block of a `kind: gan` stage (see modules/gan.py for the networks)."""

    latent_dim: int = 64
    hidden: int = 256  # MLP width (vectors)
    num_layers: int = 3  # MLP depth (vectors)
    base_channels: int = 64  # conv width at full resolution (images, latents)
    max_channels: int = 256
    generator_norm: Literal["batch", "group", "none"] = "batch"
    discriminator_norm: Literal["none", "group"] = "none"
    spectral_norm: bool = False  # bounds d's Lipschitz constant: needs data of unit scale
    loss: Literal["standard", "hinge"] = "standard"
    r1_gamma: float = 0.0
    n_critic: int = 1
    latents: Literal["mean", "sample"] = "mean"
    num_eval_samples: int = 1000
    # p(x | class) of labelled images or latents (K classes from the data); no guidance: a GAN
    # learns no unconditional model to guide with.
    class_conditional: bool = False

    def __post_init__(self):
        require_positive(self, "latent_dim", "hidden", "num_layers", "base_channels", "max_channels", "n_critic",
                         "num_eval_samples")
        if self.r1_gamma < 0:
            raise ValueError(f"r1_gamma: {self.r1_gamma!r} is not valid; expected a number >= 0")


class GANStage(DataSpaceStage):
    kind = "gan"
    model_config = GANModelConfig
    description = "a GAN (generator and discriminator) trained on the non-saturating loss"
    hub_tag = "gan"
    exported_classes = (Generator, Discriminator)
    auxiliary_components = ("discriminator",)
    course_name = "GAN"
    course_part = 6
    course_verdicts = {
        "efficient sampling": "+",
        "ln p(x) of a datum": "− none",
        "maximum-likelihood training": "− no: a min-max game",
        "architecture": "+ free",
        "size of Z": "+ free",
        "what else the course says": "− hard to optimize: convergence, mode collapse",
    }
    monitor = None  # no likelihood to early-stop on

    def __init__(self, config, data, input_dir: Path | None = None):
        check_class_conditional(config, data, vectors="the conditional GAN is for images")
        super().__init__(config, data, input_dir)
        training = config.training
        if training.gradient_accumulation_steps != 1 or training.early_stopping_patience is not None:
            raise ValueError(f"stages.{config.name}.training: a gan stage alternates two optimizers every step; "
                             "it needs gradient_accumulation_steps: 1 and early_stopping_patience: null")

    def build_model(self) -> GANTrainingModule:
        cfg = self.config.model
        shape = list(self.data.sample_shape)
        classes = self.data.num_classes if cfg.class_conditional else None
        generator = Generator(sample_shape=shape, latent_dim=cfg.latent_dim, hidden=cfg.hidden,
                              num_layers=cfg.num_layers, base_channels=cfg.base_channels,
                              max_channels=cfg.max_channels, norm=cfg.generator_norm,
                              output_activation="tanh" if self.data.kind == "image" else "none", num_classes=classes)
        discriminator = Discriminator(sample_shape=shape, hidden=cfg.hidden, num_layers=cfg.num_layers,
                                      base_channels=cfg.base_channels, max_channels=cfg.max_channels,
                                      norm=cfg.discriminator_norm, spectral_norm=cfg.spectral_norm,
                                      num_classes=classes)
        return GANTrainingModule(generator, discriminator, cfg.loss, cfg.r1_gamma)

    def conditioning(self, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Class-conditional: the labels as they are (-1, unlabelled: see `GANTrainingModule.fake_labels`)."""
        return {"class_labels": labels} if self.config.model.class_conditional else {}

    @classmethod
    def several_parameter_groups(cls, model_config: GANModelConfig) -> bool:
        return True

    def parameter_groups(self, model: GANTrainingModule) -> dict[str, list[torch.nn.Parameter]]:
        return {"discriminator": list(model.discriminator.parameters()),
                "generator": list(model.generator.parameters())}

    def phase_due(self, phase: str, step: int) -> bool:
        return phase == "discriminator" or step % self.config.model.n_critic == 0

    def ema_parameters(self, model: GANTrainingModule) -> list[torch.nn.Parameter]:
        """The generator's alone (StyleGAN's and BigGAN's practice): the averaged generator samples,
        while the discriminator that `validate` consults and `export` saves is the trained one."""
        return list(model.generator.parameters())

    @torch.no_grad()
    def validate(self, model: GANTrainingModule, loader, accelerator: Accelerator) -> dict[str, float]:
        """The discriminator's mean verdict d(x) on held-out data and d(f(z)) on as many fakes
        (class-conditional: d(x, c) with x's class c, fakes drawn of the same classes)."""
        verdicts = []  # (B, 2): d(x), d(f(z)) per example
        for batch in loader:
            x = self.held_out_input(batch["x"])
            labels = self.conditioning(batch["label"]).get("class_labels")
            fake_labels = model.fake_labels(labels)
            fake = model.generator.sample(x.shape[0], class_labels=fake_labels)
            verdicts.append(accelerator.gather_for_metrics(torch.sigmoid(torch.cat(
                [model.discriminator(x, labels).reshape(-1, 1), model.discriminator(fake, fake_labels).reshape(-1, 1)],
                1))))
        d_real, d_fake = torch.cat(verdicts).double().mean(0).tolist()
        return {"val_d_real": d_real, "val_d_fake": d_fake}

    def generate(self, model: GANTrainingModule, num_samples: int,
                 class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """Samples in data space; a class-conditional generator draws `class_labels` (default:
        balanced, sample i of class i mod K)."""
        labels = class_labels_for(model.generator.config.num_classes, num_samples, class_labels,
                                  device=model.generator.device)
        return self.to_data_space(model.generator.sample(num_samples, class_labels=labels))

    def trained_classes(self, model: GANTrainingModule) -> int | None:
        return model.generator.config.num_classes

    def export(self, model: GANTrainingModule, stage_dir: Path) -> None:
        model.generator.save_pretrained(stage_dir / "generator")
        model.discriminator.save_pretrained(stage_dir / "discriminator")
        self.write_space(stage_dir)

    @classmethod
    @torch.no_grad()
    def sample(cls, stage_dir: Path, num_samples: int, generator: torch.Generator, device: torch.device,
               sampler: str | None = None, steps: int | None = None, class_labels: torch.Tensor | None = None,
               guidance_scale: float = 1.0) -> torch.Tensor:
        """Samples of the exported generator (class-conditional: of `class_labels`, by default
        balanced classes); `sampler` and `steps` do not apply (one forward pass)."""
        network = Generator.from_pretrained(stage_dir / "generator").to(device).eval()
        labels = class_labels_for(network.config.num_classes, num_samples, class_labels, guidance_scale, device)
        if guidance_scale != 1:
            raise ValueError(f"guidance_scale={guidance_scale!r} (stagediff sample --guidance-scale): a GAN has no "
                             "classifier-free guidance (it learns no unconditional model to guide with); sample it "
                             "with guidance_scale 1")
        samples = network.sample(num_samples, generator=generator, class_labels=labels)  # one forward pass
        return to_data_space(samples, cls.space(stage_dir), stage_dir / "vae")

    @classmethod
    def num_classes(cls, stage_dir: Path) -> int | None:
        return Generator.load_config(stage_dir / "generator").get("num_classes")
