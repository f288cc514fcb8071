"""The seed's part VI (GAN): the losses L'(phi) and the non-saturating L''(theta), R1, the networks,
the training module's two phases, and their alternation (n_critic) in the one training loop.
(Learning the 2D ring through that loop: tests/test_gan_stage.py.)"""

import json
import math

import pytest
import torch
from accelerate.utils import set_seed
from safetensors.torch import load_file
from torch import nn

from stagediff.modules.gan import (
    Discriminator,
    GANTrainingModule,
    Generator,
    discriminator_loss,
    generator_loss,
    r1_penalty,
)
from stagediff.pipelines.data import load_data
from stagediff.pipelines.registry import parse_run_config
from stagediff.pipelines.run import make_accelerator
from stagediff.pipelines.stage_folder import CHECKPOINTS_DIR, exported_weights
from stagediff.pipelines.stages.gan import GANStage
from stagediff.pipelines.trainer import train_stage

from reliability.helpers import train


def stable_softplus(t: float) -> float:
    """ln(1 + e^t) by hand, for reference values at any t."""
    return max(t, 0.0) + math.log1p(math.exp(-abs(t)))


# --------------------------------------------------------------------------------------------- losses


@pytest.mark.numerics
def test_standard_losses_are_the_seeds_formulas():
    """With d = sigmoid(logit): L'(phi) = mean(-ln d(x) - ln(1 - d(f(z)))), L''(theta) = mean(-ln d(f(z)))."""
    generator = torch.Generator().manual_seed(0)
    real_logits = 3 * torch.randn(64, generator=generator, dtype=torch.float64)
    fake_logits = 3 * torch.randn(64, generator=generator, dtype=torch.float64)
    d_real, d_fake = torch.sigmoid(real_logits), torch.sigmoid(fake_logits)

    expected_d = (-torch.log(d_real) - torch.log(1 - d_fake)).mean()
    expected_g = (-torch.log(d_fake)).mean()
    torch.testing.assert_close(discriminator_loss(real_logits, fake_logits, "standard"), expected_d, rtol=1e-12, atol=0)
    torch.testing.assert_close(generator_loss(fake_logits, "standard"), expected_g, rtol=1e-12, atol=0)
    # The non-saturating loss is not the seed's first L'' = ln(1 - d(f(z))) (which it replaces).
    assert not torch.allclose(generator_loss(fake_logits), torch.log(1 - d_fake).mean())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.numerics
def test_standard_losses_stay_finite_and_exact_at_extreme_logits(dtype):
    """At logits +-50 a naive ln(1 - sigmoid(50)) is ln(0) (float32 and float64 round sigmoid(50) to 1);
    the softplus form gives the exact value ln(1 + e^50) = 50 + ln(1 + e^-50)."""
    logits = [-50.0, -20.0, 0.0, 20.0, 50.0]
    real_logits = torch.tensor(logits, dtype=dtype)
    fake_logits = torch.tensor(logits[::-1], dtype=dtype)  # the worst case: confident and wrong
    naive_d = (-torch.log(torch.sigmoid(real_logits)) - torch.log(1 - torch.sigmoid(fake_logits))).mean()
    assert not torch.isfinite(naive_d)  # the premise: the formula as written overflows here

    expected_d = sum(stable_softplus(-r) + stable_softplus(f) for r, f in zip(logits, logits[::-1])) / len(logits)
    expected_g = sum(stable_softplus(-f) for f in logits[::-1]) / len(logits)
    real_logits.requires_grad_(True)
    fake_logits.requires_grad_(True)
    loss_d = discriminator_loss(real_logits, fake_logits, "standard")
    loss_g = generator_loss(fake_logits, "standard")
    assert loss_d.item() == pytest.approx(expected_d, rel=1e-6)
    assert loss_g.item() == pytest.approx(expected_g, rel=1e-6)
    # Gradients too: d/dl softplus(l) = sigmoid(l), finite everywhere (the naive form gives NaN).
    (grad_fake,) = torch.autograd.grad(loss_d, fake_logits)
    torch.testing.assert_close(grad_fake, torch.sigmoid(fake_logits.detach()) / len(logits))


@pytest.mark.numerics
def test_hinge_losses():
    """D: mean relu(1 - l(x)) + mean relu(1 + l(f(z))); G: -mean l(f(z)); by hand."""
    real = torch.tensor([2.0, 0.5, -1.0], dtype=torch.float64)
    fake = torch.tensor([-2.0, 0.3, 1.0], dtype=torch.float64)
    # relu(1 - real) = [0, 0.5, 2]; relu(1 + fake) = [0, 1.3, 2].
    assert discriminator_loss(real, fake, "hinge").item() == pytest.approx((2.5 + 3.3) / 3, rel=1e-12)
    assert generator_loss(fake, "hinge").item() == pytest.approx(-(-2.0 + 0.3 + 1.0) / 3, rel=1e-12)
    with pytest.raises(ValueError, match="unknown GAN loss"):
        generator_loss(fake, "wasserstein")


# ------------------------------------------------------------------------- the non-saturating gradient


def optimal_logit(x: torch.Tensor, mu_d: float, mu_g: float, s: float) -> torch.Tensor:
    """logit of d*(x) = p_data / (p_data + p_g) for N(mu_d, s^2) against N(mu_g, s^2):
    ln p_data(x) - ln p_g(x) = ((x - mu_g)^2 - (x - mu_d)^2) / (2 s^2). phi is fixed: mu_g is a float."""
    return ((x - mu_g) ** 2 - (x - mu_d) ** 2) / (2 * s**2)


def generator_gradient(mu_g: float, mu_d: float = 0.0, s: float = 1.0, saturating: bool = False) -> float:
    """d/d mu_g of the generator's loss through x = mu_g + s z (the reparameterization), with the
    discriminator held at its optimum for the current mu_g."""
    z = torch.randn(4096, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mu = torch.tensor(mu_g, dtype=torch.float64, requires_grad=True)
    logits = optimal_logit(mu + s * z, mu_d, mu_g, s)
    # saturating: the seed's first L'' = ln(1 - d(f(z))) = -softplus(l); otherwise -ln d(f(z)).
    loss = -torch.nn.functional.softplus(logits).mean() if saturating else generator_loss(logits, "standard")
    (grad,) = torch.autograd.grad(loss, mu)
    return grad.item()


@pytest.mark.parametrize("mu_g", [-3.0, -0.5, 0.5, 3.0])
def test_non_saturating_gradient_points_the_generator_at_the_data(mu_g):
    """Gradient descent moves mu_g towards mu_d = 0 from either side."""
    grad = generator_gradient(mu_g)
    assert grad * mu_g > 0  # a step -lr * grad moves mu_g towards 0
    assert generator_gradient(mu_g, saturating=True) * mu_g > 0  # same direction, different size


def test_non_saturating_gradient_does_not_vanish_when_the_discriminator_is_confident():
    """Far from the data d*(f(z)) ~ 0: ln(1 - d) is flat there, -ln d is not (the seed's reason
    for the replacement). At mu_g = 6 s the fakes' logits are about -18 (18 - 6 x). The saturating
    gradient does not vanish altogether: the few fakes in p_g's lower tail (x < 3) are where d is
    not yet ~ 0, and they carry it; it still is hundreds of times smaller."""
    non_saturating = abs(generator_gradient(6.0))
    saturating = abs(generator_gradient(6.0, saturating=True))
    assert non_saturating > 1.0  # ~ |mu_g - mu_d| / s^2 = 6 (the logit's slope), times E[1 - d] ~ 1
    assert non_saturating > 100 * saturating
    # Near the data both are of the same order.
    assert abs(generator_gradient(0.5)) < 10 * abs(generator_gradient(0.5, saturating=True))


# ------------------------------------------------------------------------------------------------ R1


@pytest.mark.numerics
def test_r1_of_a_linear_discriminator_is_its_squared_weight_norm():
    """l(x) = w.x + b: grad_x l = w for every x, so R1 = ||w||^2, and d R1 / d w = 2 w."""
    torch.manual_seed(0)
    linear = nn.Linear(12, 1).double()
    discriminator = nn.Sequential(nn.Flatten(), linear, nn.Flatten(0))  # (B, 3, 2, 2) -> (B,)
    x = torch.randn(5, 3, 2, 2, dtype=torch.float64)
    penalty = r1_penalty(discriminator, x)
    w = linear.weight.detach().flatten()
    torch.testing.assert_close(penalty, w @ w)
    penalty.backward()  # create_graph: the penalty trains phi
    torch.testing.assert_close(linear.weight.grad.flatten(), 2 * w)
    assert not x.requires_grad  # the caller's batch is left alone


@pytest.mark.numerics
def test_r1_of_a_quadratic_discriminator_averages_per_sample_gradients():
    """l(x) = x^T A x / 2 with A symmetric: grad_x l = A x, so R1 = mean_i ||A x_i||^2."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(4, 4, generator=generator, dtype=torch.float64)
    a = a + a.T
    x = torch.randn(7, 4, generator=generator, dtype=torch.float64)
    penalty = r1_penalty(lambda v: 0.5 * torch.einsum("bi,ij,bj->b", v, a, v), x)
    torch.testing.assert_close(penalty, (x @ a).pow(2).sum(1).mean())


# ------------------------------------------------------------------------------------------- networks


@pytest.mark.parametrize("shape", [(2,), (5,), (1, 32, 32), (4, 8, 8)])
@pytest.mark.parametrize("spectral_norm", [False, True])
def test_network_shapes_and_save_load_round_trip(shape, spectral_norm, tmp_path):
    torch.manual_seed(0)
    generator = Generator(shape, latent_dim=6, hidden=16, base_channels=8, max_channels=16, norm="group",
                          output_activation="none")
    discriminator = Discriminator(shape, hidden=16, base_channels=8, max_channels=16, spectral_norm=spectral_norm)
    x = generator.sample(3, generator=torch.Generator().manual_seed(1))
    assert x.shape == (3, *shape)
    logits = discriminator(x)
    assert logits.shape == (3,)

    generator.eval().save_pretrained(tmp_path / "generator")
    discriminator.eval().save_pretrained(tmp_path / "discriminator")
    assert (tmp_path / "generator" / "diffusion_pytorch_model.safetensors").exists()
    generator2 = Generator.from_pretrained(tmp_path / "generator").eval()
    discriminator2 = Discriminator.from_pretrained(tmp_path / "discriminator").eval()
    with torch.no_grad():
        x = generator.sample(3, generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(generator2.sample(3, generator=torch.Generator().manual_seed(2)), x)
        torch.testing.assert_close(discriminator2(x), discriminator(x))


def test_generator_output_activation_and_latent_dim():
    torch.manual_seed(0)
    tanh = Generator((3, 16, 16), latent_dim=5, base_channels=8, output_activation="tanh")
    tanh.net[0].weight.data.mul_(100)  # large pre-activations: tanh still bounds the output
    assert tanh.sample(4).abs().max() <= 1
    assert tanh.sample(4).shape == (4, 3, 16, 16)
    latent = Generator((4, 8, 8), latent_dim=3, base_channels=8, output_activation="none", norm="none")
    latent.net[0].weight.data.mul_(100)
    assert latent.sample(4).abs().max() > 1  # latents are not squashed into [-1, 1]
    with pytest.raises(ValueError):
        Generator((3, 12, 12))
    with pytest.raises(ValueError):
        Generator((2,), output_activation="sigmoid")


@pytest.mark.numerics
def test_spectral_norm_bounds_each_layers_spectral_norm():
    """Weights W / sigma_max(W), sigma_max by power iteration (one per training-mode forward): even
    after the raw weights are blown up, a few forward passes bring every layer's norm back to ~1."""
    torch.manual_seed(0)
    for shape in [(2,), (1, 16, 16)]:
        discriminator = Discriminator(shape, hidden=32, base_channels=8, spectral_norm=True).train()
        plain = Discriminator(shape, hidden=32, base_channels=8, spectral_norm=False)
        layers = [m for m in discriminator.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        plain_layers = [m for m in plain.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        with torch.no_grad():
            for layer, plain_layer in zip(layers, plain_layers):
                layer.parametrizations.weight.original.mul_(10)
                plain_layer.weight.mul_(10)
            for _ in range(10):
                discriminator(torch.randn(4, *shape))
        norms = [torch.linalg.matrix_norm(layer.weight.detach().flatten(1), 2).item() for layer in layers]
        plain_norms = [torch.linalg.matrix_norm(layer.weight.flatten(1), 2).item() for layer in plain_layers]
        assert all(0.999 < n < 1.05 for n in norms), norms
        assert min(plain_norms) > 3  # without it the same weights are far from 1


# ------------------------------------------------------------------------------------------- training


def tiny_gan(**options) -> GANTrainingModule:
    torch.manual_seed(0)
    generator = Generator((2,), latent_dim=4, hidden=32, num_layers=2, norm="none", output_activation="none")
    discriminator = Discriminator((2,), hidden=32, num_layers=2)
    return GANTrainingModule(generator, discriminator, **options)


@pytest.mark.numerics
def test_discriminator_terms_are_the_seeds_loss_plus_r1():
    gan = tiny_gan(r1_gamma=3.0)
    x = torch.randn(8, 2)
    torch.manual_seed(1)
    terms = gan(x, phase="discriminator")
    torch.manual_seed(1)
    with torch.no_grad():
        fake = gan.generator.sample(8)
    real_logits, fake_logits = gan.discriminator(x), gan.discriminator(fake)
    expected = discriminator_loss(real_logits, fake_logits) + 1.5 * r1_penalty(gan.discriminator, x)
    torch.testing.assert_close(terms["loss"], expected)
    torch.testing.assert_close(terms["d_real"], torch.sigmoid(real_logits).mean().detach())
    torch.testing.assert_close(terms["d_fake"], torch.sigmoid(fake_logits).mean().detach())
    terms["loss"].backward()
    assert all(p.grad is None for p in gan.generator.parameters())  # fakes are detached
    assert all(p.grad is not None for p in gan.discriminator.parameters())

    gan.zero_grad(set_to_none=True)
    gan(x, phase="generator")["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gan.generator.parameters())


def test_the_one_loop_steps_the_generator_every_n_critic_th_step(tmp_path):
    """Through pipelines/trainer.py with the gan stage: each step the discriminator's optimizer steps,
    every n_critic-th (here 2nd) step the generator's too, each moving its own player only."""
    config = parse_run_config({
        "output_dir": str(tmp_path), "seed": 0, "log_with": "none",
        "data": {"source": "toy", "toy": "ring8", "toy_samples": 256},
        "stages": [{"name": "gan", "kind": "gan",
                    "model": {"latent_dim": 4, "hidden": 16, "num_layers": 1, "generator_norm": "none",
                              "n_critic": 2, "num_eval_samples": 16},
                    "training": {"max_steps": 4, "batch_size": 16, "learning_rate": 1e-2, "lr_scheduler": "constant",
                                 "log_every": 1, "checkpointing_steps": 1}}]})
    stage = GANStage(config.stages[0], load_data(config.data))
    set_seed(config.seed)  # the trainer builds the model after the same call: the initial weights
    weights = [{k: v.clone() for k, v in stage.build_model().state_dict().items()}]
    (tmp_path / "gan").mkdir()
    train_stage(make_accelerator(config), stage, config, tmp_path / "gan",
                on_checkpoint=lambda model, step: weights.append(
                    {k: v.detach().clone() for k, v in model.state_dict().items()}))

    def moved(before: dict, after: dict, player: str) -> bool:
        return any(not torch.equal(before[k], after[k]) for k in before if k.startswith(player + "."))

    changed = [(moved(a, b, "generator"), moved(a, b, "discriminator")) for a, b in zip(weights, weights[1:])]
    assert changed == [(False, True), (True, True), (False, True), (True, True)]
    history = [json.loads(line) for line in (tmp_path / "gan" / "history.jsonl").read_text().splitlines()]
    assert ["generator_loss" in row for row in history] == [False, True, False, True]
    assert all("discriminator_loss" in row for row in history)


def test_each_player_has_its_own_cosine_schedule_and_only_the_generator_is_averaged(tmp_path):
    """n_critic = 2: the discriminator steps 20 times in 20 training steps, the generator 10. Each
    schedule counts its own optimizer steps (a 4-step warm-up each, then a cosine to 0 at the last
    step), and the EMA averages the generator alone: the exported discriminator is the trained one.
    A run resumed from step 12 ends with the same exported weights."""
    def raw_config(output_dir, **training) -> dict:
        return {"output_dir": str(output_dir), "seed": 0, "log_with": "none",
                "data": {"source": "toy", "toy": "ring8", "toy_samples": 256},
                "stages": [{"name": "gan", "kind": "gan",
                            "model": {"latent_dim": 4, "hidden": 16, "num_layers": 1, "generator_norm": "none",
                                      "n_critic": 2, "num_eval_samples": 16},
                            "training": {"max_steps": 20, "batch_size": 16, "learning_rate": 1e-2,
                                         "lr_scheduler": "cosine", "lr_warmup_steps": 4, "ema_decay": 0.5,
                                         "log_every": 20, **training}}]}

    train(raw_config(tmp_path / "straight", checkpointing_steps=4, checkpoints_total_limit=None))
    stage_dir = tmp_path / "straight" / "gan"
    checkpoints = stage_dir / CHECKPOINTS_DIR

    def last_lr(step: int, player: str) -> float:
        # Accelerate saves the schedulers in the order the trainer prepares them: the stage's groups.
        name = {"discriminator": "scheduler.bin", "generator": "scheduler_1.bin"}[player]
        return torch.load(checkpoints / f"checkpoint-{step}" / name, weights_only=True)["_last_lr"][0]

    # Warm-up over each player's own first 4 steps: the discriminator's by training step 4, the
    # generator's (2 of its steps by then) by training step 8.
    assert last_lr(4, "discriminator") == pytest.approx(1e-2, rel=1e-12)
    assert last_lr(4, "generator") == pytest.approx(1e-2 * 2 / 4, rel=1e-12)
    assert last_lr(8, "generator") == pytest.approx(1e-2, rel=1e-12)
    # Both cosines end at 0 with the last training step (a shared 20-step schedule left the
    # generator at 0.69 of its learning rate).
    assert last_lr(20, "discriminator") == pytest.approx(0.0, abs=1e-12)
    assert last_lr(20, "generator") == pytest.approx(0.0, abs=1e-12)

    trained = load_file(checkpoints / "checkpoint-20" / "model.safetensors")
    averaged = {k.removeprefix("averaged."): v for k, v in
                load_file(checkpoints / "checkpoint-20" / "ema.safetensors").items()}
    for player, expected in (("discriminator", trained), ("generator", averaged)):
        exported = load_file(stage_dir / player / "diffusion_pytorch_model.safetensors")
        for key, value in exported.items():
            assert torch.equal(value, expected[f"{player}.{key}"]), (player, key)
    assert any(not torch.equal(averaged[k], trained[k]) for k in trained if k.startswith("generator."))

    train(raw_config(tmp_path / "resumed", resume_from_checkpoint=str(checkpoints / "checkpoint-12")))
    assert exported_weights(tmp_path / "resumed" / "gan") == exported_weights(stage_dir)
