"""The seed's adversarial network (part VI, "Réseau antagoniste (GAN)"): networks, losses, training.

A generator f(z; theta), z ~ N(0, I), defines p_m(x | theta) implicitly (it need not be invertible,
only sampled). A discriminator d(x; phi) in (0, 1) gives the lower bound of a divergence

    D(p_m || p_data) >= max_phi  E_{z ~ N(0, I)}[ln(1 - d(f(z; theta); phi))] + E_{x ~ p_data}[ln d(x; phi)]

(the reparameterization trick moved the expectation over p_m onto z), and training solves

    min_theta max_phi  E_z[ln(1 - d(f(z; theta); phi))] + E_x[ln d(x; phi)].

In practice the seed alternates
  1. one gradient step on phi with  L'_i(phi) = -ln(1 - d(f(z_ech; theta); phi)) - ln d(x_i; phi),
  2. one gradient step on theta with L''_i(theta) = ln(1 - d(f(z_ech; theta); phi)), "in practice
     replaced by" the non-saturating -ln d(f(z_ech; theta); phi): both push d(f(z)) towards 1, but
     when d confidently rejects the fakes (d ~ 0, early in training) ln(1 - d) is flat while
     -ln d is not, so the generator still gets a gradient.

The discriminator here returns the logit l(x) with d(x) = sigmoid(l(x)); every loss is written in
logits with softplus(t) = ln(1 + e^t), which never overflows:
    -ln d(x)     = softplus(-l(x)),        -ln(1 - d(x)) = softplus(l(x)).

Driving the two optimizers is the one training loop's work (pipelines/trainer.py, with the stage
pipelines/stages/gan.py naming the two parameter groups); per training step, in the seed's order:

    1. module(x_real, phase="discriminator")["loss"], backward, the discriminator's optimizer steps;
    2. every n_critic-th step: module(x_real, phase="generator")["loss"], backward, the
       generator's optimizer steps.

  - Each player has its own optimizer, over `module.discriminator.parameters()` or
    `module.generator.parameters()`; never one over `module.parameters()` (each loss would then
    also move the other player).
  - The generator's loss backpropagates *through* the discriminator, leaving gradients on phi:
    they are zeroed before the discriminator's next backward.
  - The discriminator phase samples fakes under no_grad, so no gradient reaches theta there.
  - Each player's learning-rate schedule runs over its own optimizer steps, and an EMA of the
    weights (`training.ema_decay`) averages the generator only (the stage's `ema_parameters`):
    the discriminator is a training device, consulted and exported as trained.
  - Call the module (its `forward`), not `discriminator_terms` directly, when it is wrapped in
    DistributedDataParallel: only `forward` synchronises gradients. The discriminator phase leaves
    the generator's parameters unused, so DDP needs find_unused_parameters=True.

Class-conditional GAN (cGAN): with `num_classes` K both players see a class c in 0..K-1. The
generator f(z, c; theta) looks c up in a learned embedding concatenated to z (Mirza & Osindero
2014); the discriminator is the projection discriminator of Miyato & Koyama 2018 ("cGANs with
Projection Discriminator", eq. 3),

    l(x, c) = psi(phi(x)) + <embed(c), phi(x)>,

phi(x) its last hidden features and psi the linear output layer. The optimal logit is
ln p_data(x, c) / p_m(x, c) = ln p_data(c | x) / p_m(c | x) + ln p_data(x) / p_m(x); with both
class posteriors softmax models over shared features phi(x), the first term is <v_c, phi(x)> up
to a function of x alone (absorbed into psi), hence the inner product rather than c concatenated
to x. The losses are unchanged; fakes are drawn with the labels of the real batch they are judged
with, so the classes' frequencies are the data's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import Tensor, nn

GAN_LOSSES = ("standard", "hinge")
IMAGE_RESOLUTIONS = (4, 8, 16, 32, 64)
OUTPUT_ACTIVATIONS = ("tanh", "none")


# --------------------------------------------------------------------------------------------- losses


def discriminator_loss(real_logits: Tensor, fake_logits: Tensor, kind: str = "standard") -> Tensor:
    """Batch mean of the discriminator's loss, from logits l = logit d. (B,), (B,) -> ().

    "standard": the seed's L'_i(phi) = -ln d(x_i) - ln(1 - d(f(z)))
                = softplus(-l(x_i)) + softplus(l(f(z))).
    "hinge" (Lim & Ye 2017, Miyato et al. 2018): relu(1 - l(x_i)) + relu(1 + l(f(z))).
    """
    _check_kind(kind)
    if kind == "standard":
        return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
    return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()


def generator_loss(fake_logits: Tensor, kind: str = "standard") -> Tensor:
    """Batch mean of the generator's loss, from the logits of its samples. (B,) -> ().

    "standard": the seed's non-saturating replacement of ln(1 - d(f(z))): -ln d(f(z)) = softplus(-l(f(z))).
    "hinge": -l(f(z)) (the generator side of the hinge GAN).
    """
    _check_kind(kind)
    if kind == "standard":
        return F.softplus(-fake_logits).mean()
    return -fake_logits.mean()


def r1_penalty(discriminator: Callable[[Tensor], Tensor], real_x: Tensor) -> Tensor:
    """R1 = E_{x ~ p_data} ||grad_x l(x)||^2 (Mescheder et al. 2018, "Which training methods for
    GANs actually converge?"), l the discriminator's logit. Built with create_graph=True so that
    the penalty itself backpropagates into phi. Returns () (mean over the batch)."""
    x = real_x.detach().requires_grad_(True)
    return _gradient_penalty(discriminator(x), x)


def _gradient_penalty(logits: Tensor, x: Tensor) -> Tensor:
    # Samples do not interact in the discriminator (no batch norm), so the gradient of the
    # batch's summed logits holds each sample's own gradient in its row.
    (grad,) = torch.autograd.grad(logits.sum(), x, create_graph=True)  # (B, *sample_shape)
    return grad.pow(2).flatten(1).sum(1).mean()


def _check_kind(kind: str) -> None:
    if kind not in GAN_LOSSES:
        raise ValueError(f"unknown GAN loss {kind!r}; valid: {', '.join(GAN_LOSSES)}")


# ------------------------------------------------------------------------------------------- networks


def _parse_shape(sample_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in sample_shape)
    if len(shape) == 1:
        return shape
    if len(shape) == 3 and shape[1] == shape[2] and shape[1] in IMAGE_RESOLUTIONS:
        return shape
    raise ValueError(f"sample_shape must be (D,) or (C, H, H) with H in {IMAGE_RESOLUTIONS}, got {shape}")


def _widths(resolution: int, base_channels: int, max_channels: int) -> list[int]:
    """Channels at resolutions 4, 8, ..., `resolution`: base_channels at full resolution, doubled
    per halving of it, capped at max_channels."""
    num_levels = int(math.log2(resolution // 4)) + 1
    return [min(base_channels * 2 ** (num_levels - 1 - i), max_channels) for i in range(num_levels)]


def _norm(kind: str, channels: int, num_groups: int, image: bool) -> nn.Module:
    if kind == "none":
        return nn.Identity()
    if kind == "batch":
        return nn.BatchNorm2d(channels) if image else nn.BatchNorm1d(channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(num_groups, channels), channels)
    raise ValueError(f"unknown norm {kind!r}; valid: batch, group, none")


class Generator(ModelMixin, ConfigMixin):
    """f(z; theta): z (B, latent_dim) ~ N(0, I) -> x (B, *sample_shape), the seed's generator.

    Vectors, sample_shape (D,): an MLP, Linear -> [norm] -> ReLU per hidden layer.
    Images or latents, sample_shape (C, H, H), H in {4, ..., 64} (DCGAN-style): a linear projection
    of z to (widths[0], 4, 4), then per doubling nearest-neighbour upsampling + 3x3 conv (no
    checkerboard artefacts of strided transposed convs), each followed by norm + ReLU, and a last
    3x3 conv to C channels.

    Args:
        sample_shape: (D,) or (C, H, H).
        latent_dim: the dimension of z, independent of the data's size.
        hidden: MLP width (vectors).
        num_layers: MLP hidden layers (vectors).
        base_channels: conv width at full resolution, doubled per halving down to 4x4 (images).
        max_channels: cap on the conv width (images).
        norm: "batch" (DCGAN), "group" or "none". Batch norm normalises with running statistics
            in eval mode; "group" behaves the same in both modes.
        norm_num_groups: groups of "group" norm (gcd with the width is used).
        output_activation: "tanh" for data in [-1, 1] (pixels), "none" for unbounded data
            (VAE latents, toy vectors).
        num_classes: K of a class-conditional generator f(z, c), c in 0..K-1: a (K, latent_dim)
            embedding of c, N(0, I)-initialised like z, is concatenated to z; None: f(z).
    """

    @register_to_config
    def __init__(self, sample_shape: Sequence[int] = (2,), latent_dim: int = 64, hidden: int = 256,
                 num_layers: int = 3, base_channels: int = 64, max_channels: int = 512, norm: str = "batch",
                 norm_num_groups: int = 8, output_activation: str = "tanh", num_classes: int | None = None):
        super().__init__()
        shape = _parse_shape(sample_shape)
        if output_activation not in OUTPUT_ACTIVATIONS:
            raise ValueError(f"unknown output_activation {output_activation!r}; valid: {', '.join(OUTPUT_ACTIVATIONS)}")
        self.shape = shape
        self.activation = nn.Tanh() if output_activation == "tanh" else nn.Identity()
        self.class_embedding = _class_embedding(num_classes, latent_dim)
        input_dim = latent_dim if num_classes is None else 2 * latent_dim  # [z, embed(c)]
        if len(shape) == 1:
            layers, width = [], input_dim
            for _ in range(num_layers):
                layers += [nn.Linear(width, hidden), _norm(norm, hidden, norm_num_groups, False), nn.ReLU()]
                width = hidden
            self.net = nn.Sequential(*layers, nn.Linear(width, shape[0]))
        else:
            widths = _widths(shape[1], base_channels, max_channels)
            layers = [nn.Linear(input_dim, widths[0] * 16), nn.Unflatten(1, (widths[0], 4, 4)),  # (B, w0, 4, 4)
                      _norm(norm, widths[0], norm_num_groups, True), nn.ReLU()]
            for c_in, c_out in zip(widths[:-1], widths[1:]):
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c_in, c_out, 3, padding=1),
                           _norm(norm, c_out, norm_num_groups, True), nn.ReLU()]  # resolution doubled
            self.net = nn.Sequential(*layers, nn.Conv2d(widths[-1], shape[0], 3, padding=1))

    def forward(self, z: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """(B, latent_dim) [and (B,) classes of a class-conditional generator] -> (B, *sample_shape)."""
        if _check_labels(self, class_labels):
            z = torch.cat([z, self.class_embedding(class_labels)], 1)  # (B, 2 * latent_dim)
        return self.activation(self.net(z))

    def sample(self, num_samples: int, generator: torch.Generator | None = None,
               class_labels: Tensor | None = None) -> Tensor:
        """x = f(z; theta) (or f(z, c; theta) with `class_labels` c, (num_samples,)), z ~ N(0, I):
        sampling is one forward pass. (num_samples, *sample_shape).

        Gradients flow when enabled (the generator's training uses this); wrap in torch.no_grad()
        and call .eval() for inference. z is drawn on `generator`'s device when one is given.
        """
        device = generator.device if generator is not None else self.device
        z = torch.randn(num_samples, self.config.latent_dim, generator=generator, device=device)
        labels = None if class_labels is None else class_labels.to(self.device)
        return self(z.to(device=self.device, dtype=self.dtype), labels)


class Discriminator(ModelMixin, ConfigMixin):
    """d(x; phi) as its logit: x (B, *sample_shape) -> l(x) (B,), with d(x) = sigmoid(l(x)).

    Vectors: an MLP with LeakyReLU(0.2). Images (C, H, H): a 3x3 conv, then per halving a 4x4
    stride-2 conv down to 4x4 (DCGAN), each followed by [norm] + LeakyReLU(0.2), and a linear layer
    on the flattened 4x4 features. No batch norm: it would couple the samples of a batch, which
    R1 (a per-sample gradient) and the real/fake batches' separate statistics do not tolerate.

    Args:
        sample_shape: (D,) or (C, H, H).
        hidden: MLP width (vectors).
        num_layers: MLP hidden layers (vectors).
        base_channels, max_channels: conv widths as in `Generator` (images).
        norm: "none" or "group" (images).
        norm_num_groups: groups of "group" norm.
        spectral_norm: reparameterise every Linear/Conv weight as W / sigma_max(W) (Miyato et al.
            2018, torch.nn.utils.parametrizations.spectral_norm; sigma_max by one power iteration
            per training-mode forward), which bounds each layer's Lipschitz constant by ~1. The
            whole discriminator is then ~1-Lipschitz in x, so its logit cannot separate detail
            much finer than 1: standardise the data first. Measured on PacGAN's ring (modes of std
            0.01): 0-1 of 8 modes with it, 8 of 8 with the data scaled by 10.
        num_classes: K of a projection discriminator l(x, c) = psi(phi(x)) + <embed(c), phi(x)>
            (Miyato & Koyama 2018): phi(x) the input of the last linear layer psi, embed a (K, F)
            table (Xavier-initialised, as in the paper's code; spectrally normalised with the
            rest); None: l(x) = psi(phi(x)).
    """

    @register_to_config
    def __init__(self, sample_shape: Sequence[int] = (2,), hidden: int = 256, num_layers: int = 3,
                 base_channels: int = 64, max_channels: int = 512, norm: str = "none", norm_num_groups: int = 8,
                 spectral_norm: bool = False, num_classes: int | None = None):
        super().__init__()
        shape = _parse_shape(sample_shape)
        if norm not in ("none", "group"):
            raise ValueError(f"discriminator norm must be 'none' or 'group', got {norm!r}")
        self.shape = shape
        if len(shape) == 1:
            layers, width = [], shape[0]
            for _ in range(num_layers):
                layers += [nn.Linear(width, hidden), nn.LeakyReLU(0.2)]
                width = hidden
            self.net = nn.Sequential(*layers, nn.Linear(width, 1))
        else:
            widths = _widths(shape[1], base_channels, max_channels)[::-1]  # full resolution first
            layers = [nn.Conv2d(shape[0], widths[0], 3, padding=1), nn.LeakyReLU(0.2)]
            for c_in, c_out in zip(widths[:-1], widths[1:]):
                layers += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), _norm(norm, c_out, norm_num_groups, True),
                           nn.LeakyReLU(0.2)]
            self.net = nn.Sequential(*layers, nn.Flatten(), nn.Linear(widths[-1] * 16, 1))
        self.class_embedding = _class_embedding(num_classes, self.net[-1].in_features)
        if self.class_embedding is not None:
            nn.init.xavier_uniform_(self.class_embedding.weight)
        if spectral_norm:
            for module in self.modules():
                if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
                    nn.utils.parametrizations.spectral_norm(module)

    def forward(self, x: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """(B, *sample_shape) [and (B,) classes of a projection discriminator] -> logits (B,).

        A label -1 (an unlabelled real datum of a partly labelled set) gets psi(phi(x)) alone."""
        phi = self.net[:-1](x)  # (B, F)
        logits = self.net[-1](phi).squeeze(1)  # psi(phi(x)), (B,)
        if _check_labels(self, class_labels):
            labelled = class_labels >= 0
            projection = (self.class_embedding(class_labels.clamp(min=0)) * phi).sum(1)  # <embed(c), phi(x)>
            logits = logits + torch.where(labelled, projection, torch.zeros_like(projection))
        return logits


def _class_embedding(num_classes: int | None, dim: int) -> nn.Embedding | None:
    if num_classes is None:
        return None
    if num_classes < 1:
        raise ValueError(f"num_classes: {num_classes!r} is not valid; expected an integer >= 1 (or None)")
    return nn.Embedding(num_classes, dim)


def _check_labels(network: Generator | Discriminator, class_labels: Tensor | None) -> bool:
    """Whether `network` is class-conditional, once its labels are checked against it (present
    exactly when it is)."""
    num_classes = network.config.num_classes
    if (num_classes is None) != (class_labels is None):
        raise ValueError(f"{type(network).__name__}: class_labels must be given exactly when the network is "
                         f"class-conditional (num_classes={num_classes}); got "
                         f"{'none' if class_labels is None else 'some'}")
    return num_classes is not None


class PatchDiscriminator(ModelMixin, ConfigMixin):
    """PatchGAN (Isola et al. 2017, pix2pix; taming-transformers' `NLayerDiscriminator`, Esser et
    al. 2021): a logit per overlapping patch of an image rather than one per image, so that it judges
    local texture and sharpness; the adversarial term of the latent-diffusion autoencoder (Rombach et
    al. 2022). x (B, C, H, W) -> logits (B, 1, H', W'), H' = floor(H / 2^num_layers) - 2
    (`logit_map_size`); each patch's logit goes to `discriminator_loss`/`generator_loss` as one datum.

    Layers as in the reference: a 4x4 stride-2 conv + LeakyReLU(0.2); num_layers - 1 more 4x4 stride-2
    convs, widths doubled up to 8 x base_channels, each + norm + LeakyReLU(0.2); one 4x4 stride-1 conv
    of the next width + norm + LeakyReLU(0.2); a last 4x4 stride-1 conv to one channel. Conv weights
    start from N(0, 0.02), as in the reference's `weights_init`. Unlike the reference's batch norm,
    the norm is group norm (or none), so the real and fake batches' statistics never mix (the same
    reason as `Discriminator`'s).

    Args:
        in_channels: the images' channels.
        base_channels: width of the first conv (the reference's ndf, 64).
        num_layers: stride-2 convs (the reference's n_layers, 3 at 256x256); each halves the logit
            map and widens the receptive field (34 pixels with 2, 70 with 3).
        norm: "group" or "none".
        norm_num_groups: groups of "group" norm (gcd with the width is used).
    """

    @register_to_config
    def __init__(self, in_channels: int = 3, base_channels: int = 64, num_layers: int = 3, norm: str = "group",
                 norm_num_groups: int = 32):
        super().__init__()
        if norm not in ("none", "group"):
            raise ValueError(f"patch discriminator norm must be 'none' or 'group', got {norm!r}")
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        widths = [base_channels * min(2 ** n, 8) for n in range(num_layers + 1)]
        bias = norm == "none"  # an affine norm right after a conv makes its bias redundant
        layers = [nn.Conv2d(in_channels, widths[0], 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        for n in range(1, num_layers + 1):
            stride = 2 if n < num_layers else 1  # resolution halved num_layers times in all
            layers += [nn.Conv2d(widths[n - 1], widths[n], 4, stride=stride, padding=1, bias=bias),
                       _norm(norm, widths[n], norm_num_groups, True), nn.LeakyReLU(0.2)]
        self.net = nn.Sequential(*layers, nn.Conv2d(widths[-1], 1, 4, stride=1, padding=1))
        for module in self.net.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)

    @staticmethod
    def logit_map_size(size: int, num_layers: int) -> int:
        """Side of the logit map for an input side `size`: each 4x4 stride-2 conv (padding 1) maps
        s to floor(s / 2), each 4x4 stride-1 conv to s - 1. Below 1, the image is too small."""
        return size // 2 ** num_layers - 2

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> patch logits (B, 1, H', W')."""
        return self.net(x)


# ----------------------------------------------------------------------------------------- training


class GANTrainingModule(nn.Module):
    """The two players and their losses, for a loop with two optimizers (see the module docstring).

    Parameter groups: `self.generator.parameters()` (theta) and `self.discriminator.parameters()` (phi).

    Args:
        generator: f(z; theta).
        discriminator: logit of d(x; phi).
        loss: "standard" (the seed's L' and non-saturating L'') or "hinge".
        r1_gamma: weight gamma of the R1 penalty, added to the discriminator's loss as
            gamma / 2 * E||grad_x l(x)||^2 (Mescheder et al.'s convention); 0 turns it off.

    How often each player steps (the seed's strict alternation, or n_critic discriminator steps
    per generator step) is the loop's schedule: the stage's `phase_due`. Class-conditional players
    (`num_classes` set on both) take the real batch's `class_labels` (B,) in every phase.
    """

    def __init__(self, generator: Generator, discriminator: Discriminator, loss: str = "standard",
                 r1_gamma: float = 0.0):
        super().__init__()
        _check_kind(loss)
        if generator.config.num_classes != discriminator.config.num_classes:
            raise ValueError(f"the generator's num_classes ({generator.config.num_classes}) and the "
                             f"discriminator's ({discriminator.config.num_classes}) differ")
        self.generator = generator
        self.discriminator = discriminator
        self.loss_kind = loss
        self.r1_gamma = r1_gamma

    def fake_labels(self, class_labels: Tensor | None) -> Tensor | None:
        """The classes to draw fakes of, beside a real batch of `class_labels`: the same, but a
        uniformly drawn class for each unlabelled (-1) datum; None for unconditional players."""
        if class_labels is None:
            return None
        drawn = torch.randint(self.generator.config.num_classes, class_labels.shape, device=class_labels.device)
        return torch.where(class_labels < 0, drawn, class_labels)

    def discriminator_terms(self, x_real: Tensor, class_labels: Tensor | None = None) -> dict[str, Tensor]:
        """The seed's L'(phi) on a batch of real data (of `class_labels`, class-conditional) and as
        many fresh fakes of the same classes (detached: no gradient reaches theta), plus the R1
        penalty on the real batch.

        Returns loss (the total to backpropagate), d_real = mean d(x), d_fake = mean d(f(z)),
        r1 = E||grad_x l(x)||^2 (0 when r1_gamma is 0), all ().
        """
        fake_labels = self.fake_labels(class_labels)
        with torch.no_grad():
            x_fake = self.generator.sample(x_real.shape[0], class_labels=fake_labels)  # (B, *sample_shape)
        if self.r1_gamma:
            x_real = x_real.detach().requires_grad_(True)
        real_logits = self.discriminator(x_real, class_labels)  # (B,)
        fake_logits = self.discriminator(x_fake, fake_labels)  # (B,)
        loss = discriminator_loss(real_logits, fake_logits, self.loss_kind)
        if self.r1_gamma:
            r1 = _gradient_penalty(real_logits, x_real)  # reuses the real batch's forward pass
            loss = loss + 0.5 * self.r1_gamma * r1
        else:
            r1 = torch.zeros((), device=loss.device)
        return {"loss": loss, "d_real": torch.sigmoid(real_logits.detach()).mean(),
                "d_fake": torch.sigmoid(fake_logits.detach()).mean(), "r1": r1.detach()}

    def generator_terms(self, batch_size: int, class_labels: Tensor | None = None) -> dict[str, Tensor]:
        """The generator's loss on `batch_size` fresh samples (of the classes `fake_labels` gives
        for the real batch's `class_labels`, class-conditional; non-saturating -ln d(f(z)) for
        "standard"); its gradient flows through the discriminator into theta (and leaves
        gradients on phi, to be zeroed before the discriminator's next step).

        Returns loss and d_fake = mean d(f(z)), both ().
        """
        labels = self.fake_labels(class_labels)
        fake_logits = self.discriminator(self.generator.sample(batch_size, class_labels=labels), labels)  # (B,)
        return {"loss": generator_loss(fake_logits, self.loss_kind),
                "d_fake": torch.sigmoid(fake_logits.detach()).mean()}

    def forward(self, x_real: Tensor, phase: str = "discriminator",
                class_labels: Tensor | None = None) -> dict[str, Tensor]:
        """`discriminator_terms(x_real, class_labels)` or `generator_terms(len(x_real), class_labels)`
        by `phase`, through forward so that a DDP wrapper synchronises the gradients."""
        if phase == "discriminator":
            return self.discriminator_terms(x_real, class_labels)
        if phase == "generator":
            return self.generator_terms(x_real.shape[0], class_labels)
        raise ValueError(f"phase must be 'discriminator' or 'generator', got {phase!r}")
