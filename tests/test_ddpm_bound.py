"""DDPM's variational bound (Ho et al. 2020, eq. 5) in bits/dim: against a direct sum of its
terms written out per pixel, on a model whose terms are known in closed form, and through the
stage's evaluation."""

import math

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.models.unets.unet_2d import UNet2DOutput
from torch import nn

from stagediff.modules.ddpm import discretized_gaussian_log_likelihood, variational_bound
from stagediff.modules.likelihood import PIXEL_SCALE
from stagediff.pipelines.config import ConfigError
from stagediff.pipelines.data import load_data
from stagediff.pipelines.registry import parse_run_config
from stagediff.pipelines.stages.ddpm import DDPMStage

from reliability.helpers import train



class PointMassOracle(nn.Module):
    """The exact noise predictor for data that is one image x*: eps = (x_t - sqrt(abar_t) x*) / sqrt(1 - abar_t)."""

    def __init__(self, image: torch.Tensor, scheduler: DDPMScheduler, prediction_type: str = "epsilon"):
        super().__init__()
        self.image, self.scheduler, self.prediction_type = image.double(), scheduler, prediction_type
        self.anchor = nn.Parameter(torch.zeros((), dtype=torch.float64))  # the dtype the bound reads

    def forward(self, xt, t):
        abar = torch.cumprod(1 - self.scheduler.betas.double(), 0)[t].view(-1, 1, 1, 1)
        eps = (xt - abar.sqrt() * self.image) / (1 - abar).sqrt()
        if self.prediction_type == "v_prediction":
            eps = abar.sqrt() * eps - (1 - abar).sqrt() * self.image
        return UNet2DOutput(sample=eps)


class Noisy(nn.Module):
    """A fixed, imperfect predictor: every KL term is then non-zero."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(0.7, dtype=torch.float64))

    def forward(self, xt, t):
        return UNet2DOutput(sample=self.weight * torch.tanh(xt) + 1e-3 * t.view(-1, 1, 1, 1))


def eight_bit_images(n: int, seed: int = 0) -> torch.Tensor:
    k = torch.randint(0, 256, (n, 1, 3, 3), generator=torch.Generator().manual_seed(seed))
    k[0, 0, 0] = torch.tensor([0, 255, 128])  # both open end bins and an interior one
    return k.double() / PIXEL_SCALE - 1


@pytest.mark.numerics
def test_decoder_bins_are_a_probability_distribution_over_the_256_values():
    values = (torch.arange(256, dtype=torch.float64) / PIXEL_SCALE - 1).view(256, 1)
    mean, logvar = torch.tensor([[-0.97, 0.1, 0.999, 3.0]], dtype=torch.float64), torch.tensor(math.log(0.02 ** 2))
    probabilities = discretized_gaussian_log_likelihood(values.expand(256, 4), mean.expand(256, 4), logvar).exp()
    assert torch.allclose(probabilities.sum(0), torch.ones(4, dtype=torch.float64), atol=1e-12)
    # An interior bin is Phi(b) - Phi(a), with the CDF written from erf.
    cdf = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))
    k, mu, sigma = 100, 0.1, 0.02
    x = k / PIXEL_SCALE - 1
    expected = cdf((x + 1 / 255 - mu) / sigma) - cdf((x - 1 / 255 - mu) / sigma)
    assert probabilities[k, 1].item() == pytest.approx(expected, rel=1e-9)


@pytest.mark.numerics
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_bound_equals_the_direct_sum_of_its_terms(prediction_type):
    scheduler = DDPMScheduler(num_train_timesteps=12, beta_schedule="linear", beta_start=1e-3, beta_end=0.2,
                              prediction_type=prediction_type)
    network, x0 = Noisy(), eight_bit_images(4)
    terms = variational_bound(network, scheduler, x0, torch.Generator().manual_seed(1))

    # The same draws of eps, one per term in order t = 1..T, then each term from the textbook formulas.
    generator = torch.Generator().manual_seed(1)
    betas = scheduler.betas.double()
    abar = torch.cumprod(1 - betas, 0)
    total = torch.zeros(4, dtype=torch.float64)
    kl = lambda m0, v0, m1, v1: 0.5 * (math.log(v1 / v0) + (v0 + (m0 - m1) ** 2) / v1 - 1)  # 1-D Gaussians
    for i in range(12):
        eps = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
        xt = abar[i].sqrt() * x0 + (1 - abar[i]).sqrt() * eps
        out = network(xt, torch.full((4,), i)).sample
        eps_hat = out if prediction_type == "epsilon" else abar[i].sqrt() * out + (1 - abar[i]).sqrt() * xt
        mean = (xt - betas[i] / (1 - abar[i]).sqrt() * eps_hat) / (1 - betas[i]).sqrt()
        if i == 0:  # the decoder, with Ho et al.'s variance beta~_2
            var = (1 - abar[0]) / (1 - abar[1]) * betas[1]
            cdf = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))
            for b, p in ((b, p) for b in range(4) for p in range(9)):
                x, m = x0[b].flatten()[p].item(), mean[b].flatten()[p].item()
                upper = 1.0 if x > 0.999 else cdf((x + 1 / 255 - m) / math.sqrt(var))
                lower = 0.0 if x < -0.999 else cdf((x - 1 / 255 - m) / math.sqrt(var))
                total[b] -= math.log(upper - lower)
            continue
        abar_prev = abar[i - 1]
        var = (1 - abar_prev) / (1 - abar[i]) * betas[i]
        posterior = (abar_prev.sqrt() * betas[i] * x0 + (1 - betas[i]).sqrt() * (1 - abar_prev) * xt) / (1 - abar[i])
        for b, p in ((b, p) for b in range(4) for p in range(9)):
            total[b] += kl(posterior[b].flatten()[p].item(), var.item(), mean[b].flatten()[p].item(), var.item())
    for b, p in ((b, p) for b in range(4) for p in range(9)):  # L_T
        total[b] += kl(abar[-1].sqrt().item() * x0[b].flatten()[p].item(), 1 - abar[-1].item(), 0.0, 1.0)
    assert torch.allclose(terms["total"], total, rtol=1e-9, atol=1e-9)
    assert torch.equal(terms["total"], terms["prior"] + terms["diffusion"] + terms["decoder"])


@pytest.mark.numerics
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_a_perfect_model_of_one_image_has_only_its_prior_and_decoder_terms(prediction_type):
    """Data that is one image x* (a Gaussian of variance 0): the exact predictor makes p_theta's
    mean q's posterior mean at every t, so every diffusion KL vanishes, the decoder's mean is x*
    and each pixel's probability is that of its bin under N(x*, beta~_2): known in closed form."""
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    image = eight_bit_images(1)
    terms = variational_bound(PointMassOracle(image, scheduler, prediction_type), scheduler, image.expand(3, -1, -1, -1),
                              torch.Generator().manual_seed(0))
    assert terms["diffusion"].abs().max() < 1e-6  # a wrong t / t-1 coefficient leaves ~1e2 nats here
    betas = scheduler.betas.double()
    abar = torch.cumprod(1 - betas, 0)
    sigma = math.sqrt((1 - abar[0]) / (1 - abar[1]) * betas[1])
    half_bin = 1 / 255 / sigma
    interior = math.log(math.erf(half_bin / math.sqrt(2)))  # ln(Phi(h) - Phi(-h))
    end = math.log(0.5 * (1 + math.erf(half_bin / math.sqrt(2))))  # ln Phi(h)
    ends = int(((image == -1) | (image == 1)).sum())
    assert terms["decoder"] == pytest.approx(torch.full((3,), -(ends * end + (9 - ends) * interior), dtype=torch.float64), rel=1e-9)
    prior = sum(0.5 * ((1 - abar[-1]) + abar[-1] * x ** 2 - 1 - math.log(1 - abar[-1])) for x in image.flatten().tolist())
    assert terms["prior"] == pytest.approx(torch.full((3,), float(prior), dtype=torch.float64), rel=1e-9)


def pixel_ddpm_config(output_dir, **model) -> dict:
    return {"output_dir": str(output_dir), "seed": 0, "log_with": "none",
            "data": {"source": "mnist", "resolution": 16, "max_train_samples": 256, "max_eval_samples": 128},
            "stages": [{"name": "ddpm", "kind": "ddpm",
                        "model": {"block_out_channels": [8, 16], "attention": [False, False], "norm_num_groups": 8,
                                  "num_train_timesteps": 50, "num_inference_steps": 5, "num_eval_samples": 16,
                                  **model},
                        "training": {"max_steps": 3, "batch_size": 16, "log_every": 1}}]}


def test_the_stage_reports_the_bound_in_bits_per_dim_and_the_report_shows_it(tmp_path):
    results = train(pixel_ddpm_config(tmp_path / "run", num_bound_images=6))
    metrics = results["ddpm"]
    parts = sum(metrics[f"nll_bound_{name}_bits_per_dim"] for name in ("prior", "diffusion", "decoder"))
    assert metrics["nll_bound_bits_per_dim"] == pytest.approx(parts, rel=1e-9)
    # Three steps of training: far from a good model, yet a bound on 8-bit data, so above 0 and
    # finite (an untrained UNet scores tens of bits/dim; a uniform model 8).
    assert 0 < metrics["nll_bound_bits_per_dim"] < 1e3
    found = DDPMStage.likelihood(metrics, "image")
    assert (found.kind, found.value, found.unit) == ("bound", metrics["nll_bound_bits_per_dim"], "bits/dim")


def test_the_bound_is_refused_where_it_is_not_defined(tmp_path):
    raw = pixel_ddpm_config(tmp_path / "run", num_bound_images=4, class_conditional=True)
    config = parse_run_config(raw)
    with pytest.raises(ValueError, match=r"stages.ddpm.model.num_bound_images: .*unconditional pixel-space"):
        DDPMStage(config.stages[0], load_data(config.data))
    raw["stages"][0]["model"].update(class_conditional=False, num_bound_images=-1)
    with pytest.raises(ConfigError, match="num_bound_images: -1 is not valid"):
        parse_run_config(raw)
