"""Exponential moving average of a model's weights (Polyak averaging).

Kept as a full copy of the model, as in k-diffusion and NVlabs/edm, rather than diffusers'
`EMAModel` (a list of tensors): the copy saves with `save_pretrained` as safetensors inside
checkpoints and exports, so no pickle is ever needed to resume or share EMA weights.
"""

import copy
from collections.abc import Iterable

import torch
from torch import nn


class EMA(nn.Module):
    """Shadow weights w_ema <- d * w_ema + (1 - d) * w, with the usual warm-up
    d_t = min(decay, (1 + t) / (10 + t)) so early, random weights fade fast.

    Only the `averaged` parameters are averaged (a GAN's: its generator's, as in StyleGAN and
    BigGAN); the copy takes the others, like every buffer, as they are at each update.

    Args:
        model: the (unwrapped) model to average; copied, never modified.
        decay: the decay d once warmed up, e.g. 0.999.
        averaged: the parameters of `model` to average; None: all of them.
    """

    def __init__(self, model: nn.Module, decay: float, averaged: Iterable[nn.Parameter] | None = None):
        super().__init__()
        self.averaged = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        chosen = None if averaged is None else {id(p) for p in averaged}
        # Whether each parameter (in `parameters()` order, the copy's as the model's) is averaged.
        self._is_averaged = [chosen is None or id(p) in chosen for p in model.parameters()]
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self._updates = 0  # num_updates on the host: reading the buffer would wait on a GPU every step

    def _load_from_state_dict(self, *args, **kwargs):  # load_state_dict, also as a submodule
        super()._load_from_state_dict(*args, **kwargs)
        self._updates = int(self.num_updates)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One averaging step: no host-device synchronisation, one fused kernel per dtype/device."""
        t = self._updates
        decay = min(self.decay, (1 + t) / (10 + t))
        ema_params, params, copies = [], [], []
        for ema_param, param, is_averaged in zip(self.averaged.parameters(), model.parameters(), self._is_averaged):
            if is_averaged:
                ema_params.append(ema_param)
                params.append(param.detach().to(ema_param.dtype))
            else:
                copies.append((ema_param, param.detach()))
        if ema_params:
            torch._foreach_lerp_(ema_params, params, 1.0 - decay)  # one fused kernel per dtype/device
        for ema_tensor, tensor in copies + list(zip(self.averaged.buffers(), model.buffers())):
            ema_tensor.copy_(tensor)
        self.num_updates += 1
        self._updates += 1
