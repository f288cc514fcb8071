"""Min-SNR-γ loss weighting (Hang et al. 2023): whatever the network predicts (eps or v), the
weighted loss is min(SNR_t, γ) ||x - x_theta||^2, SNR_t = abar_t / (1 - abar_t)."""

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.models.unets.unet_2d import UNet2DOutput

from stagediff.modules.ddpm import EpsilonPredictionLoss
from stagediff.pipelines.registry import parse_run_config

pytestmark = pytest.mark.numerics  # float tolerances: rerun under other kernel sets

T = 1000


class Wrong(torch.nn.Module):
    """A fixed, imperfect predictor that records its inputs, so the test can recover its x estimate."""

    def forward(self, z, t):
        self.z, self.t = z, t
        self.prediction = 0.7 * z + 0.1 * torch.sin(3 * z) + 0.05
        return UNet2DOutput(sample=self.prediction)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("gamma", [0.5, 5.0])
def test_min_snr_loss_is_the_clipped_snr_times_the_x_error(prediction_type, gamma):
    scheduler = DDPMScheduler(num_train_timesteps=T, prediction_type=prediction_type, clip_sample=False)
    x = torch.randn((512, 2, 4, 4), generator=torch.Generator().manual_seed(0))
    network = Wrong()
    with torch.random.fork_rng():
        torch.manual_seed(1)
        loss = EpsilonPredictionLoss(network, scheduler, snr_gamma=gamma).per_example_loss(x).double()
    abar = scheduler.alphas_cumprod.double()[network.t].view(-1, 1, 1, 1)
    z, prediction = network.z.double(), network.prediction.double()
    if prediction_type == "epsilon":  # z = sqrt(abar) x + sqrt(1 - abar) eps
        x_hat = (z - (1 - abar).sqrt() * prediction) / abar.sqrt()
    else:  # v = sqrt(abar) eps - sqrt(1 - abar) x  =>  x = sqrt(abar) z - sqrt(1 - abar) v
        x_hat = abar.sqrt() * z - (1 - abar).sqrt() * prediction
    snr = (abar / (1 - abar)).flatten()
    expected = snr.clamp(max=gamma) * (x_hat - x.double()).pow(2).flatten(1).mean(1)
    # Float32 loss: relative error ~1e-6 of each term; the x error recovered through 1 / sqrt(abar)
    # (eps) loses ~1e-7 / sqrt(abar_t) of |z|, up to ~1e-5 relative at t = T - 1.
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-7)
    assert (snr > gamma).any() and (snr < gamma).any()  # both sides of the clip were drawn


def test_without_gamma_the_loss_is_the_seeds():
    scheduler = DDPMScheduler(num_train_timesteps=T, clip_sample=False)
    x = torch.randn((64, 2, 4, 4), generator=torch.Generator().manual_seed(0))
    losses = []
    for gamma in (None, float("inf")):
        with torch.random.fork_rng():
            torch.manual_seed(1)
            losses.append(EpsilonPredictionLoss(Wrong(), scheduler, snr_gamma=gamma).per_example_loss(x))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=0)


def test_the_config_chooses_the_weighting():
    def stage(**model):
        raw = {"data": {"source": "mnist", "resolution": 32, "channels": 1},
               "stages": [{"name": "ddpm", "kind": "ddpm", "model": model}]}
        return parse_run_config(raw).stages[0].model

    assert stage().loss_snr_gamma is None
    assert stage(loss_weighting="min_snr").loss_snr_gamma == 5.0
    assert stage(loss_weighting="min_snr", snr_gamma=2.0).loss_snr_gamma == 2.0
    with pytest.raises(ValueError, match="snr_gamma: 0"):
        stage(loss_weighting="min_snr", snr_gamma=0)
    with pytest.raises(ValueError, match="loss_weighting"):
        stage(loss_weighting="snr")
