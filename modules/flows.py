"""The seed's invertible network (part III, "Réseau inversible (NF)"): a RealNVP/Glow normalizing flow.

Change of variables. With z = h(x; theta) invertible and dz = |det J_h(x)| dx,

    1 = int N(z; 0, I) dz = int N(h(x; theta); 0, I) |det J_h(x)| dx,
    p_model(x | theta) = N(h(x; theta); 0, I) |det J_h(x)|,
    -ln p_model(x | theta) = 1/2 ||h(x; theta)||^2 - ln |det J_h(x; theta)| + cst,

(cst = D/2 ln 2 pi; the seed's slide drops the 1/2, which is part of ln N) and the flow is fitted
by maximum likelihood, L(theta) = 1/N sum_i -ln p_model(x_i | theta) (the seed's KL(p_data || p_model)
up to a constant), with early stopping on a validation set.

Class-conditional (issue 16): the same change of variables with a base density per class c,
N(mu_c, I) with a learned mean mu_c, so that h is shared and the conditional density is exact:

    -ln p_model(x | c) = 1/2 ||h(x; theta) - mu_c||^2 - ln |det J_h(x; theta)| + cst,

and Bayes' rule gives the generative classifier argmax_c ln p(x | c) + ln p(c).

Conventions shared by every layer here:

- `forward(x) -> (y, logdet)` goes in the data -> latent direction h; `logdet` is
  ln |det dy/dx| per example, shape (B,). `inverse(y) -> x` is exact (up to float rounding).
- The seed's affine coupling layer is written in the latent -> data (sampling) direction,
  x1 = z1, x2 = exp(s(z1)) * z2 + m(z1); `AffineCoupling.inverse` is that equation and
  `AffineCoupling.forward` its inverse z2 = (x2 - m(x1)) * exp(-s(x1)), whose Jacobian is
  triangular with log-determinant -sum s(x1).
- For vectors, `SplineCoupling` replaces the affine map by a monotone rational-quadratic spline
  (Neural Spline Flows), same triangular Jacobian: what sharp 2D toy densities need.
- Vectors are (B, D); images are (B, C, H, W). The "channel" axis of a vector is its feature axis,
  so `ActNorm` and `InvertibleConv1x1` work on both.

Images are expected in the repository's convention (k / 127.5 - 1, dequantized by the caller with
`modules.likelihood.dequantize`); `NormalizingFlow.bits_per_dim` converts nats with
`modules.likelihood.bits_per_dim`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils.torch_utils import randn_tensor
from einops import einsum, rearrange, reduce
from torch import nn

from .likelihood import bits_per_dim

__all__ = [
    "ActNorm",
    "AffineCoupling",
    "ConvResNet",
    "FlowNLLLoss",
    "FlowSequence",
    "InvertibleConv1x1",
    "MLPResNet",
    "NormalizingFlow",
    "Squeeze",
    "standard_normal_log_prob",
]


def _sum_per_example(t: torch.Tensor) -> torch.Tensor:
    """Sum over all but the batch axis: (B, ...) -> (B,)."""
    return reduce(t, "b ... -> b", "sum")


def _channel_view(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """A per-channel (C,) tensor shaped to broadcast against a (B, C, ...) tensor with `ndim` axes."""
    return v.view(1, -1, *([1] * (ndim - 2)))


def _spatial_size(x: torch.Tensor) -> int:
    """H * W for (B, C, H, W), 1 for vectors (B, D)."""
    return math.prod(x.shape[2:])


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """ln N(z; 0, I) summed over all but the batch axis: (B, ...) -> (B,)."""
    num_dims = math.prod(z.shape[1:])
    return -0.5 * _sum_per_example(z.pow(2)) - 0.5 * num_dims * math.log(2 * math.pi)


# ---------------------------------------------------------------------------------------------
# Conditioners: the seed's small ResNets computing s(z1) and m(z1)
# ---------------------------------------------------------------------------------------------


class _ConvBlock(nn.Module):
    """h + conv3x3(act(conv3x3(act(h)))); per-example, so the coupling stays a function of one datum."""

    def __init__(self, channels: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
            nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.net(h)


class ConvResNet(nn.Module):
    """The images' s/m network: conv3x3 -> `num_blocks` residual blocks -> conv3x3, the last one
    zero-initialised (so the coupling it drives starts as the identity). No batch statistics:
    BatchNorm would make h(x) depend on the rest of the batch."""

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int, num_blocks: int):
        super().__init__()
        self.input = nn.Conv2d(in_channels, hidden_channels, 3, padding=1)
        self.blocks = nn.Sequential(*(_ConvBlock(hidden_channels) for _ in range(num_blocks)))
        self.output = nn.Sequential(nn.SiLU(), nn.Conv2d(hidden_channels, out_channels, 3, padding=1))
        nn.init.zeros_(self.output[1].weight)
        nn.init.zeros_(self.output[1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.blocks(self.input(x)))  # (B, out_channels, H, W)


class _LinearBlock(nn.Module):
    def __init__(self, features: int):
        super().__init__()
        self.net = nn.Sequential(nn.SiLU(), nn.Linear(features, features), nn.SiLU(), nn.Linear(features, features))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.net(h)


class MLPResNet(nn.Module):
    """The vectors' s/m network: linear -> `num_blocks` residual blocks -> linear (zero-initialised).

    (No Fourier input features, unlike `modules.ddpm.MLPDenoiser`: inside a flow the conditioner's
    input is an already-transformed coordinate, and with 4 frequencies (sin/cos(2^k pi x)) the
    validation NLL on ring8 (std 0.01) ended at +48 nats after 25 s of training, against -2.0
    without.)
    """

    def __init__(self, in_features: int, out_features: int, hidden_features: int, num_blocks: int):
        super().__init__()
        self.input = nn.Linear(in_features, hidden_features)
        self.blocks = nn.Sequential(*(_LinearBlock(hidden_features) for _ in range(num_blocks)))
        self.output = nn.Sequential(nn.SiLU(), nn.Linear(hidden_features, out_features))
        nn.init.zeros_(self.output[1].weight)
        nn.init.zeros_(self.output[1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.blocks(self.input(x)))  # (B, out_features)


# ---------------------------------------------------------------------------------------------
# Layers: forward(x) -> (y, logdet) in the data -> latent direction, inverse(y) -> x
# ---------------------------------------------------------------------------------------------


class AffineCoupling(nn.Module):
    """The seed's affine coupling layer ("jacobienne triangulaire"):

        sampling (inverse):  x1 = z1,   x2 = exp(s(z1)) * z2 + m(z1)
        h (forward):         z1 = x1,   z2 = (x2 - m(x1)) * exp(-s(x1)),
        ln |det J_h(x)| = -sum_i s_i(x1),

    since dz/dx is triangular (dz1/dx2 = 0) with diagonal 1 on z1 and exp(-s) on z2. s and m come
    from one small ResNet (two output heads stacked on the channel axis), s bounded as
    s = scale_bound * tanh(raw) so one layer never rescales by more than exp(scale_bound); the last
    layer is zero-initialised so the coupling starts as the identity.

    Args:
        num_channels: C of (B, C, H, W) images, or D of (B, D) vectors.
        mask: which part is z1 (left unchanged, conditions s and m):
            "checkerboard" (images): pixels with (i + j + parity) even, all channels; the network
                sees x * b and the mask b itself as an extra channel.
            "channel" (images) / "half" (vectors): the first C // 2 channels (parity 0) or the last
                C // 2 (parity 1); the network sees only those.
        parity: 0 or 1; alternate it between consecutive couplings so every entry gets transformed.
        hidden_channels: width of the ResNet (conv channels or MLP features).
        num_blocks: residual blocks in the ResNet.
        scale_bound: the bound on |s|.
    """

    def __init__(self, num_channels: int, mask: str = "channel", parity: int = 0, hidden_channels: int = 64,
                 num_blocks: int = 2, scale_bound: float = 2.0):
        super().__init__()
        if mask not in ("checkerboard", "channel", "half"):
            raise ValueError(f"mask must be 'checkerboard', 'channel' or 'half', got {mask!r}")
        if parity not in (0, 1):
            raise ValueError(f"parity must be 0 or 1, got {parity}")
        if mask != "checkerboard" and num_channels < 2:
            raise ValueError(f"a {mask!r} coupling needs at least 2 channels, got {num_channels}")
        self.num_channels = num_channels
        self.mask = mask
        self.parity = parity
        self.scale_bound = scale_bound
        if mask == "checkerboard":
            self.net = ConvResNet(num_channels + 1, 2 * num_channels, hidden_channels, num_blocks)
        else:
            # Split point: parity 0 conditions on x[:, :C // 2]; parity 1 on x[:, C - C // 2:].
            self.split = num_channels // 2 if parity == 0 else num_channels - num_channels // 2
            num_conditioning = num_channels // 2
            num_transformed = num_channels - num_conditioning
            if mask == "channel":
                self.net = ConvResNet(num_conditioning, 2 * num_transformed, hidden_channels, num_blocks)
            else:
                self.net = MLPResNet(num_conditioning, 2 * num_transformed, hidden_channels, num_blocks)

    def _checkerboard(self, x: torch.Tensor) -> torch.Tensor:
        """b = 1 on the conditioning pixels: (1, 1, H, W)."""
        h, w = x.shape[-2:]
        i = torch.arange(h, device=x.device)[:, None]
        j = torch.arange(w, device=x.device)[None, :]
        return ((i + j + self.parity) % 2 == 0).to(x.dtype)[None, None]

    def _scale_shift(self, conditioning: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """s(z1) (bounded) and m(z1) from the network's stacked output."""
        raw, m = rearrange(self.net(conditioning), "b (two c) ... -> two b c ...", two=2)
        return self.scale_bound * torch.tanh(raw), m

    def _parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(conditioning z1, transformed z2) parts of a split ("channel"/"half") input."""
        first, second = x[:, :self.split], x[:, self.split:]
        return (first, second) if self.parity == 0 else (second, first)

    def _join(self, conditioning: torch.Tensor, transformed: torch.Tensor) -> torch.Tensor:
        parts = (conditioning, transformed) if self.parity == 0 else (transformed, conditioning)
        return torch.cat(parts, dim=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mask == "checkerboard":
            b = self._checkerboard(x)  # (1, 1, H, W)
            s, m = self._scale_shift(torch.cat([x * b, b.expand(x.shape[0], 1, *x.shape[2:])], dim=1))  # (B, C, H, W)
            s, m = s * (1 - b), m * (1 - b)  # zero on z1: there z = x
            return (x - m) * torch.exp(-s), -_sum_per_example(s)
        x1, x2 = self._parts(x)  # (B, C1, ...), (B, C2, ...)
        s, m = self._scale_shift(x1)  # (B, C2, ...) each
        return self._join(x1, (x2 - m) * torch.exp(-s)), -_sum_per_example(s)

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        if self.mask == "checkerboard":
            b = self._checkerboard(z)
            s, m = self._scale_shift(torch.cat([z * b, b.expand(z.shape[0], 1, *z.shape[2:])], dim=1))
            return torch.exp(s * (1 - b)) * z + m * (1 - b)  # x2 = exp(s(z1)) z2 + m(z1); x1 = z1
        z1, z2 = self._parts(z)
        s, m = self._scale_shift(z1)
        return self._join(z1, torch.exp(s) * z2 + m)


def rational_quadratic_spline(x: torch.Tensor, widths: torch.Tensor, heights: torch.Tensor,
                              derivatives: torch.Tensor, bound: float, inverse: bool = False,
                              min_bin: float = 1e-3, min_derivative: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Monotone rational-quadratic spline on [-bound, bound], identity outside (Durkan et al.,
    "Neural Spline Flows", 2019, eqs. 4-6 and appendix A), elementwise.

    Args:
        x: (N,) inputs (outputs of the spline when `inverse`).
        widths, heights: (N, K) unnormalised bin sizes (softmax, at least `min_bin` of the interval).
        derivatives: (N, K - 1) unnormalised derivatives at the inner knots (softplus); the two
            outer knots have derivative 1, matching the identity tails.
    Returns:
        y (N,) and ln |dy/dx| (N,) of the forward map, at x (forward) or at the returned x (inverse).
    """
    num_bins = widths.shape[-1]
    inside = (x >= -bound) & (x <= bound)
    y, logdet = x.clone(), torch.zeros_like(x)
    if not inside.any():
        return y, logdet
    x_in = x[inside]

    def knots(raw: torch.Tensor) -> torch.Tensor:  # (n, K + 1) positions from -bound to bound
        sizes = min_bin + (1 - min_bin * num_bins) * torch.softmax(raw[inside], dim=-1)
        cumulative = F.pad(torch.cumsum(sizes, dim=-1), (1, 0))
        cumulative = 2 * bound * cumulative - bound
        return torch.cat([cumulative[:, :1].clamp(max=-bound), cumulative[:, 1:-1],
                          cumulative[:, -1:].clamp(min=bound)], dim=-1)

    xs, ys = knots(widths), knots(heights)
    d = F.pad(min_derivative + F.softplus(derivatives[inside]), (1, 1), value=1.0)  # (n, K + 1)
    search = ys if inverse else xs
    k = (torch.searchsorted(search[:, 1:-1].contiguous(), x_in[:, None]).squeeze(-1)).clamp(0, num_bins - 1)

    def at(t: torch.Tensor, offset: int = 0) -> torch.Tensor:
        return t.gather(-1, (k + offset)[:, None]).squeeze(-1)

    x_k, w_k = at(xs), at(xs, 1) - at(xs)
    y_k, h_k = at(ys), at(ys, 1) - at(ys)
    d_k, d_k1 = at(d), at(d, 1)
    s_k = h_k / w_k
    if inverse:
        dy = x_in - y_k
        a = h_k * (s_k - d_k) + dy * (d_k1 + d_k - 2 * s_k)
        b = h_k * d_k - dy * (d_k1 + d_k - 2 * s_k)
        c = -s_k * dy
        theta = (2 * c) / (-b - torch.sqrt((b * b - 4 * a * c).clamp(min=0)))
        y[inside] = theta * w_k + x_k
    else:
        theta = (x_in - x_k) / w_k
    one_minus = theta * (1 - theta)
    denominator = s_k + (d_k1 + d_k - 2 * s_k) * one_minus
    if not inverse:
        y[inside] = y_k + h_k * (s_k * theta * theta + d_k * one_minus) / denominator
    derivative = s_k * s_k * (d_k1 * theta * theta + 2 * s_k * one_minus + d_k * (1 - theta) ** 2) / denominator ** 2
    logdet[inside] = torch.log(derivative)
    return y, logdet


class SplineCoupling(nn.Module):
    """A coupling layer with a rational-quadratic spline instead of the affine map (vectors):

        h (forward):  z1 = x1,  z2 = g(x2; theta(x1)),  ln |det J_h| = sum_i ln g'(x2_i),

    g monotone on [-bound, bound] with K bins, identity outside; theta from an MLP ResNet of x1
    (zero-initialised output: g starts as the identity). Far more flexible per layer than
    x2 exp(s) + m: it can give a coordinate many sharp modes, as the 2D toys have.

    Args:
        num_channels: D of (B, D) vectors (>= 2).
        parity: 0 conditions on the first D // 2 entries, 1 on the last D // 2.
        hidden_channels, num_blocks: the MLP ResNet's width and depth.
        num_bins: K.
        bound: the spline's interval is [-bound, bound].
    """

    def __init__(self, num_channels: int, parity: int = 0, hidden_channels: int = 64, num_blocks: int = 2,
                 num_bins: int = 8, bound: float = 4.0):
        super().__init__()
        if num_channels < 2:
            raise ValueError(f"a spline coupling needs at least 2 channels, got {num_channels}")
        self.parity = parity
        self.num_bins = num_bins
        self.bound = bound
        self.split = num_channels // 2 if parity == 0 else num_channels - num_channels // 2
        num_conditioning = num_channels // 2
        self.num_transformed = num_channels - num_conditioning
        self.net = MLPResNet(num_conditioning, self.num_transformed * (3 * num_bins - 1), hidden_channels, num_blocks)

    _parts = AffineCoupling._parts  # the same "half" split and join as the affine coupling's
    _join = AffineCoupling._join

    def _transform(self, conditioning: torch.Tensor, values: torch.Tensor, inverse: bool):
        params = self.net(conditioning).view(-1, 3 * self.num_bins - 1)  # (B * D2, 3K - 1)
        widths, heights, derivatives = params.split([self.num_bins, self.num_bins, self.num_bins - 1], dim=-1)
        out, logdet = rational_quadratic_spline(values.reshape(-1), widths, heights, derivatives, self.bound, inverse)
        return out.view_as(values), logdet.view_as(values).sum(dim=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x1, x2 = self._parts(x)
        z2, logdet = self._transform(x1, x2, inverse=False)
        return self._join(x1, z2), logdet

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        z1, z2 = self._parts(z)
        return self._join(z1, self._transform(z1, z2, inverse=True)[0])


class ActNorm(nn.Module):
    """Glow's activation normalisation: y = (x + bias) * exp(log_scale) per channel,
    ln |det| = (H * W) * sum_c log_scale_c (H * W = 1 for vectors).

    Data-dependent initialisation: the first `forward` sets bias = -mean and log_scale = -ln std
    over the batch (and pixels), so that batch comes out with zero mean and unit variance per
    channel. Whether that happened is the persistent buffer `initialized`, saved in state dicts
    (`save_pretrained`): a reloaded model does not re-initialise on its next batch (a plain Python
    attribute, as in several public implementations, is lost on reload). Under torch.distributed
    the statistics are averaged over processes (equal per-process batches assumed), so every
    replica starts from the same parameters: DDP only averages gradients afterwards.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.log_scale = nn.Parameter(torch.zeros(num_channels))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Set bias and log_scale from the batch x (B, C, ...) and mark the layer initialised."""
        per_channel = rearrange(x, "b c ... -> c (b ...)")  # (C, N)
        moments = torch.stack([per_channel.mean(dim=1), per_channel.pow(2).mean(dim=1)])  # (2, C)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(moments)
            moments = moments / torch.distributed.get_world_size()
        mean, second_moment = moments
        std = (second_moment - mean.pow(2)).clamp_min(0).sqrt()
        self.bias.copy_(-mean)
        self.log_scale.copy_(-torch.log(std + self.eps))
        self.initialized.fill_(True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.initialized:
            self.initialize(x)
        bias, log_scale = _channel_view(self.bias, x.ndim), _channel_view(self.log_scale, x.ndim)
        y = (x + bias) * torch.exp(log_scale)
        logdet = (_spatial_size(x) * self.log_scale.sum()).expand(x.shape[0])  # (B,)
        return y, logdet

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        bias, log_scale = _channel_view(self.bias, y.ndim), _channel_view(self.log_scale, y.ndim)
        return y * torch.exp(-log_scale) - bias


class InvertibleConv1x1(nn.Module):
    """Glow's invertible 1x1 convolution y = W x (per pixel; a plain invertible linear map of
    vectors), LU-parameterised: W = P L (U + diag(sign_s * exp(log_s))), P a fixed permutation,
    L unit lower triangular, U strictly upper triangular, so ln |det W| = sum log_s and
    ln |det J| = (H * W) * sum log_s. Initialised at a random rotation (|det W| = 1).
    """

    def __init__(self, num_channels: int):
        super().__init__()
        q, _ = torch.linalg.qr(torch.randn(num_channels, num_channels))  # random orthogonal
        p, lower, upper = torch.linalg.lu(q)
        s = torch.diagonal(upper)
        self.register_buffer("permutation", p)
        self.register_buffer("sign_s", torch.sign(s))
        self.lower = nn.Parameter(torch.tril(lower, -1))
        self.upper = nn.Parameter(torch.triu(upper, 1))
        self.log_s = nn.Parameter(torch.log(s.abs()))

    def weight(self) -> torch.Tensor:
        """W (C_out, C_in) from its LU factors."""
        eye = torch.eye(self.log_s.shape[0], device=self.log_s.device, dtype=self.log_s.dtype)
        lower = torch.tril(self.lower, -1) + eye
        upper = torch.triu(self.upper, 1) + torch.diag(self.sign_s * torch.exp(self.log_s))
        return self.permutation @ lower @ upper

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = einsum(self.weight(), x, "i j, b j ... -> b i ...")  # (B, C, ...)
        logdet = (_spatial_size(x) * self.log_s.sum()).expand(x.shape[0])  # (B,)
        return y, logdet

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return einsum(torch.linalg.inv(self.weight()), y, "i j, b j ... -> b i ...")


class Squeeze(nn.Module):
    """RealNVP's squeeze: each 2x2 spatial block becomes 4 channels, a permutation (logdet 0).
    (B, C, H, W) -> (B, 4C, H/2, W/2)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = rearrange(x, "b c (h h2) (w w2) -> b (c h2 w2) h w", h2=2, w2=2)
        return y, x.new_zeros(x.shape[0])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return rearrange(y, "b (c h2 w2) h w -> b c (h h2) (w w2)", h2=2, w2=2)


class FlowSequence(nn.Module):
    """Composition h = h_K o ... o h_1: ln |det J_h| = sum_k ln |det J_{h_k}| (chain rule)."""

    def __init__(self, layers: Sequence[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logdet = x.new_zeros(x.shape[0])  # (B,)
        for layer in self.layers:
            x, layer_logdet = layer(x)
            logdet = logdet + layer_logdet
        return x, logdet

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        for layer in reversed(self.layers):
            y = layer.inverse(y)
        return y


def flow_step(num_channels: int, coupling: nn.Module) -> FlowSequence:
    """One Glow step: ActNorm -> invertible 1x1 conv (learned channel mixing) -> coupling."""
    return FlowSequence([ActNorm(num_channels), InvertibleConv1x1(num_channels), coupling])


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class NormalizingFlow(ModelMixin, ConfigMixin):
    """p_model(x | theta) = N(h(x; theta); 0, I) |det J_h(x)| with an exactly invertible h.

    Class-conditional (`num_classes` K): p_model(x | c) = N(h(x; theta); mu_c, I) |det J_h(x)|,
    one learned base mean mu_c per class (`class_means`, (K, D), zero-initialised: training
    starts from the unconditional flow), and the class prior ln p(c) as the buffer
    `class_log_prior` (K,) (uniform until the owner sets it, e.g. to training frequencies); both
    are saved with the weights. Without `num_classes` the flow has neither.

    Vectors, sample_shape = (D,): `steps_per_scale` steps of [ActNorm, invertible linear map (LU),
    affine coupling with alternating halves (MLP ResNet)]; `num_scales` is ignored.

    Images, sample_shape = (C, H, W), multi-scale (RealNVP/Glow): for each of `num_scales` scales,
    squeeze (C, H, W) -> (4C, H/2, W/2), then `steps_per_scale` steps of [ActNorm, invertible 1x1
    conv, affine coupling (conv ResNet, `coupling_mask`, alternating parity)], then, except after
    the last scale, split off half the channels: they leave the flow and go straight to the
    N(0, I) prior. H and W must be divisible by 2 ** num_scales.

    The latent z = h(x) is returned flattened, shape (B, D), D = prod(sample_shape): the
    factored-out parts in the order they left, each flattened as (c h w), then the final tensor.
    `inverse` takes the same layout (`latent_shapes` lists the parts' shapes).

    Args:
        sample_shape: (C, H, W) or (D,).
        num_scales: scales of the image flow.
        steps_per_scale: flow steps per scale (all the vector flow's steps).
        hidden_channels: width of each coupling's ResNet.
        num_blocks: residual blocks in each coupling's ResNet.
        scale_bound: |s| <= scale_bound in each coupling.
        coupling: "affine" (the seed's) or "spline" (`SplineCoupling`, vectors only).
        num_bins, spline_bound: the spline couplings' K and interval [-bound, bound].
        coupling_mask: "channel" (Glow) or "checkerboard" (RealNVP) for image couplings. The
            couplings act after each squeeze, so a checkerboard at 1x1 resolution (the last scale
            of a fully squeezed image) degenerates to an input-independent affine map.
        num_classes: K of a class-conditional flow (labels 0..K-1); None: unconditional.
    """

    @register_to_config
    def __init__(self, sample_shape: Sequence[int] = (2,), num_scales: int = 2, steps_per_scale: int = 4,
                 hidden_channels: int = 64, num_blocks: int = 2, scale_bound: float = 2.0,
                 coupling_mask: str = "channel", coupling: str = "affine", num_bins: int = 8,
                 spline_bound: float = 4.0, num_classes: int | None = None):
        super().__init__()
        shape = tuple(int(n) for n in sample_shape)
        self.num_dims = math.prod(shape)
        self.is_image = len(shape) == 3
        self.class_means = None
        if num_classes is not None:
            if num_classes < 1:
                raise ValueError(f"num_classes must be None or >= 1, got {num_classes}")
            self.class_means = nn.Parameter(torch.zeros(num_classes, self.num_dims))  # mu_c, (K, D)
            self.register_buffer("class_log_prior", torch.full((num_classes,), -math.log(num_classes)))  # ln p(c)
        if len(shape) == 1:
            def vector_coupling(parity: int) -> nn.Module:
                if coupling == "spline":
                    return SplineCoupling(shape[0], parity, hidden_channels, num_blocks, num_bins, spline_bound)
                return AffineCoupling(shape[0], "half", parity, hidden_channels, num_blocks, scale_bound)

            self.scales = nn.ModuleList([FlowSequence([
                flow_step(shape[0], vector_coupling(k % 2)) for k in range(steps_per_scale)])])
            self.latent_shapes = [shape]
            return
        if len(shape) != 3:
            raise ValueError(f"sample_shape must be (C, H, W) or (D,), got {shape}")
        if coupling != "affine":
            raise ValueError(f"coupling {coupling!r} is for vectors only; image flows use affine couplings")
        if coupling_mask not in ("channel", "checkerboard"):
            raise ValueError(f"coupling_mask must be 'channel' or 'checkerboard', got {coupling_mask!r}")
        c, h, w = shape
        if h % 2**num_scales or w % 2**num_scales:
            raise ValueError(f"H and W must be divisible by 2 ** num_scales = {2**num_scales}, got {h}x{w}")
        scales, self.latent_shapes = [], []
        for scale in range(num_scales):
            c, h, w = 4 * c, h // 2, w // 2
            steps = [flow_step(c, AffineCoupling(c, coupling_mask, k % 2, hidden_channels, num_blocks, scale_bound))
                     for k in range(steps_per_scale)]
            scales.append(FlowSequence([Squeeze(), *steps]))
            if scale < num_scales - 1:
                self.latent_shapes.append((c // 2, h, w))  # factored out
                c = c - c // 2
        self.latent_shapes.append((c, h, w))
        self.scales = nn.ModuleList(scales)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h(x) and ln |det J_h(x)|: (B, *sample_shape) -> z (B, D), logdet (B,)."""
        logdet = x.new_zeros(x.shape[0])  # (B,)
        latents = []
        for index, scale in enumerate(self.scales):
            x, scale_logdet = scale(x)  # (B, c, h, w) or (B, D)
            logdet = logdet + scale_logdet
            if index < len(self.scales) - 1:
                factored = self.latent_shapes[index][0]
                latents.append(x[:, :factored])  # (B, c/2, h, w): to the prior
                x = x[:, factored:]
        latents.append(x)
        z = torch.cat([rearrange(part, "b ... -> b (...)") for part in latents], dim=1)  # (B, D)
        return z, logdet

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        """x = h^{-1}(z): z (B, D) in `forward`'s layout -> (B, *sample_shape)."""
        sizes = [math.prod(shape) for shape in self.latent_shapes]
        parts = [part.reshape(-1, *shape) for part, shape in zip(torch.split(z, sizes, dim=1), self.latent_shapes)]
        x = parts[-1]
        for index in reversed(range(len(self.scales))):
            if index < len(self.scales) - 1:
                x = torch.cat([parts[index], x], dim=1)  # re-attach the factored-out half
            x = self.scales[index].inverse(x)
        return x

    def log_prob(self, x: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """ln p_model(x) = ln N(h(x); 0, I) + ln |det J_h(x)|, exact: (B, ...) -> (B,) nats.

        Class-conditional: ln p_model(x | c) for the (B,) `class_labels` c; where a label is -1
        (unlabelled), or without labels, the marginal ln p_model(x) (`log_prob_given`)."""
        if self.class_means is None:
            if class_labels is not None:
                raise ValueError("class_labels given to an unconditional flow (built without num_classes)")
            z, logdet = self(x)
            return standard_normal_log_prob(z) + logdet
        return self.log_prob_given(self.class_log_likelihoods(x), class_labels)

    def class_log_likelihoods(self, x: torch.Tensor) -> torch.Tensor:
        """ln p_model(x | c) = ln N(h(x); mu_c, I) + ln |det J_h(x)| for every class c, from one
        pass of h: (B, ...) -> (B, K) nats (class-conditional flows)."""
        z, logdet = self(x)  # (B, D), (B,)
        squared = (z[:, None, :] - self.class_means.to(z.dtype)).pow(2).sum(-1)  # (B, K) ||h(x) - mu_c||^2
        return -0.5 * squared - 0.5 * self.num_dims * math.log(2 * math.pi) + logdet[:, None]

    def log_prob_given(self, class_log_likelihoods: torch.Tensor,
                       class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """(B, K) ln p(x | c) -> (B,) ln p(x | c) at `class_labels`, and for unlabelled items (-1,
        or no labels) the marginal ln p(x) = ln sum_c p(c) p(x | c), also exact."""
        marginal = (class_log_likelihoods + self.class_log_prior).logsumexp(1)  # (B,)
        if class_labels is None:
            return marginal
        given = class_log_likelihoods.gather(1, class_labels.clamp(min=0)[:, None]).squeeze(1)  # (B,)
        return torch.where(class_labels >= 0, given, marginal)

    def bayes_classify(self, class_log_likelihoods: torch.Tensor) -> torch.Tensor:
        """The generative classifier: (B, K) ln p(x | c) -> (B,) argmax_c ln p(x | c) + ln p(c)."""
        return (class_log_likelihoods + self.class_log_prior).argmax(1)

    def nll(self, x: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """-ln p_model(x) = 1/2 ||h(x)||^2 - ln |det J_h(x)| + D/2 ln 2 pi: (B,) nats
        (class-conditional: -ln p_model(x | c), see `log_prob`)."""
        return -self.log_prob(x, class_labels)

    def bits_per_dim(self, x: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) bits/dim of images x stored as k / 127.5 - 1 (dequantized), per modules.likelihood."""
        return bits_per_dim(self.nll(x, class_labels), self.num_dims)

    @torch.no_grad()
    def sample(self, num_samples: int, temperature: float = 1.0, generator: torch.Generator | None = None,
               class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """x = h^{-1}(T z), z ~ N(0, I): (num_samples, *sample_shape). temperature 0 gives h^{-1}(0).

        Class-conditional: x = h^{-1}(mu_c + T z) for the (num_samples,) `class_labels` c (the
        temperature scales the spread around each class's mean); without labels c ~ p(c), i.e.
        samples of the marginal."""
        z = randn_tensor((num_samples, self.num_dims), generator=generator, device=self.device, dtype=self.dtype)
        if self.class_means is None:
            if class_labels is not None:
                raise ValueError("class_labels given to an unconditional flow (built without num_classes)")
            return self.inverse(temperature * z)
        if class_labels is None:
            class_labels = torch.multinomial(self.class_log_prior.exp(), num_samples, replacement=True,
                                             generator=generator)
        return self.inverse(self.class_means[class_labels.to(self.device)] + temperature * z)


class FlowNLLLoss(nn.Module):
    """The seed's maximum-likelihood loss L(theta) = 1/N sum_i -ln p_model(x_i | theta)
    = 1/N sum_i 1/2 ||h(x_i)||^2 - ln |det J_h(x_i)| + cst.

    Returns {"loss": mean NLL per dimension (nats/dim: learning rates do not depend on the data's
    size), "nll_nats": mean NLL per example (nats)}. Images must be dequantized by the caller
    (`modules.likelihood.dequantize`) for the NLL to be a bound on the discrete data's.
    """

    def __init__(self, flow: NormalizingFlow):
        super().__init__()
        self.flow = flow

    def forward(self, x: torch.Tensor, class_labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """A class-conditional flow's loss is -ln p(x | c) for the (B,) `class_labels` (-1:
        unlabelled, the marginal -ln p(x))."""
        nll = self.flow.nll(x, class_labels).float().mean()
        return {"loss": nll / self.flow.num_dims, "nll_nats": nll}
