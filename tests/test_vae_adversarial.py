"""Latent diffusion's autoencoder recipe in `kind: vae` (Rombach et al. 2022, after Esser et al.
2021): l1/l2 reconstruction terms, a patch discriminator switched on after `disc_start` steps, and
its term weighted by taming-transformers' adaptive weight. Without a discriminator the stage is the
seed's VAE, bit for bit."""

import hashlib
import json
import math

import diffusers
import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file

from stagediff.modules.gan import PatchDiscriminator
from stagediff.modules.metrics import psnr, ssim
from stagediff.modules.vae import AdversarialVAE, GaussianVAE, adaptive_weight, gaussian_nll, make_autoencoder
from stagediff.pipelines.config import ConfigError
from stagediff.pipelines.data import load_data
from stagediff.pipelines.registry import parse_run_config
from stagediff.pipelines.stage_folder import exported_weights
from stagediff.pipelines.stages.vae import VAEStage

from helpers import noise_image_folder
from reliability.helpers import train

TINY = {"block_out_channels": [8, 16], "latent_channels": 2, "norm_num_groups": 8}
ADVERSARIAL = {"reconstruction": "l1", "disc_weight": 0.5, "disc_channels": 8, "disc_layers": 2}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict:
    return noise_image_folder(tmp_path_factory.mktemp("images"), 32)


def raw_config(output_dir, images: dict, model: dict | None = None, **training) -> dict:
    return {"output_dir": str(output_dir), "seed": 0, "log_with": "none", "data": images,
            "stages": [{"name": "vae", "kind": "vae", "model": {**TINY, **(model or {})},
                        "training": {"max_steps": 3, "batch_size": 8, "learning_rate": 1e-3, "log_every": 1,
                                     **training}}]}


def tiny_model(reconstruction="gaussian", discriminator=False, **adversarial) -> GaussianVAE:
    torch.manual_seed(0)
    autoencoder = make_autoencoder(channels=1, resolution=16, block_out_channels=[8, 8], latent_channels=2,
                                   layers_per_block=1, norm_num_groups=4)
    if not discriminator:
        return GaussianVAE(autoencoder, -1.3, "learned", 0.7, reconstruction).double()
    patches = PatchDiscriminator(in_channels=1, base_channels=8, num_layers=2)
    return AdversarialVAE(autoencoder, patches, -1.3, "learned", 0.7, reconstruction, **adversarial).double()


def by_hand(model: GaussianVAE, x: torch.Tensor, seed: int):
    """The reparameterized reconstruction and the KL, recomputed from the same noise. (x_hat, kl)."""
    torch.manual_seed(seed)
    posterior = model.autoencoder.encode(x).latent_dist
    eps = torch.randn(posterior.mean.shape, dtype=torch.float64)
    x_hat = model.autoencoder.decode(posterior.mean + torch.exp(0.5 * posterior.logvar) * eps).sample
    mu, logvar = posterior.mean.flatten(1), posterior.logvar.flatten(1)
    kl = 0.5 * (mu ** 2 + logvar.exp() - 1 - logvar).sum(1)
    return x_hat, kl


@pytest.mark.parametrize("reconstruction", ["gaussian", "l1", "l2"])
@pytest.mark.numerics
def test_reconstruction_terms_equal_their_formulas(reconstruction):
    model = tiny_model(reconstruction)
    x = torch.rand(3, 1, 16, 16, dtype=torch.float64) * 2 - 1
    torch.manual_seed(1)
    out = model(x)

    x_hat, kl = by_hand(model, x, seed=1)
    error = (x - x_hat).flatten(1)
    sigma2 = math.exp(-1.3)
    nll = 0.5 * error.shape[1] * math.log(2 * math.pi * sigma2) + (error ** 2).sum(1) / (2 * sigma2)
    rec = {"gaussian": nll, "l1": error.abs().sum(1), "l2": (error ** 2).sum(1)}[reconstruction]
    # The module returns its per-datum terms in float32 (relative rounding 6e-8): rel 1e-6.
    assert out["loss"].item() == pytest.approx(((rec + 0.7 * kl).mean() / 256).item(), rel=1e-6)
    assert out["nll"].item() == pytest.approx(nll.mean().item(), rel=1e-6)  # validation's bound, whatever trains
    if reconstruction != "gaussian":
        assert out[reconstruction].item() == pytest.approx(rec.mean().item(), rel=1e-6)
    # sigma_x^2 enters only the Gaussian term: l1/l2 leave it fixed (out of every parameter group).
    assert model.decoder_log_var.requires_grad == (reconstruction == "gaussian")


@pytest.mark.numerics
def test_without_a_discriminator_the_loss_and_gradients_are_the_pre_change_ones():
    """The seed's VAE loss as it was written before the recipe (a verbatim copy of the former
    `GaussianVAE.terms`/`forward`): same value and gradients, bit for bit."""
    from stagediff.modules.divergences import kl_std_normal

    model = tiny_model().float()
    x = torch.rand(4, 1, 16, 16) * 2 - 1

    def former_loss():
        posterior = model.autoencoder.encode(x).latent_dist
        mean = posterior.mean
        eps = torch.randn(mean.shape, device=mean.device, dtype=mean.dtype)
        z = mean + posterior.std * eps
        x_hat = model.autoencoder.decode(z).sample
        nll = gaussian_nll(x, x_hat, model.decoder_log_var.to(x_hat.dtype)).float()
        kl = kl_std_normal(posterior.mean.float(), posterior.logvar.float())
        return (nll + model.kl_weight * kl).mean() / x[0].numel()

    results = []
    for loss_fn in (lambda: model(x)["loss"], former_loss):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        loss = loss_fn()
        loss.backward()
        results.append([loss.detach()] + [p.grad.clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.numerics
def test_adaptive_weight_is_the_ratio_of_gradient_norms_at_the_decoders_last_layer():
    """lambda = ||grad L_rec|| / (||grad L_adv|| + 1e-4) at the decoder's last conv, clamped to
    [0, 1e4] and detached, times disc_weight in front of the generator's hinge term."""
    model = tiny_model("l1", discriminator=True, disc_weight=0.5, disc_start=0, disc_loss="hinge")
    x = torch.rand(3, 1, 16, 16, dtype=torch.float64) * 2 - 1
    torch.manual_seed(1)
    out = model(x, phase="autoencoder")

    x_hat, kl = by_hand(model, x, seed=1)
    rec = (x - x_hat).abs().flatten(1).sum(1)  # (B,)
    rec_loss = rec.mean() / 256
    adv_loss = -model.discriminator(x_hat).mean()  # hinge generator loss over every patch
    last_layer = model.autoencoder.decoder.conv_out.weight
    (rec_grad,) = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)
    (adv_grad,) = torch.autograd.grad(adv_loss, last_layer, retain_graph=True)
    weight = (rec_grad.norm() / (adv_grad.norm() + 1e-4)).clamp(0, 1e4)
    assert 0 < weight.item() < 1e4  # not clamped: the formula itself is checked
    # The module's terms pass through float32 (rounding 6e-8 relative), in value and in gradient: rel 1e-6.
    assert out["adaptive_weight"].item() == pytest.approx(weight.item(), rel=1e-6)
    assert out["adv_loss"].item() == pytest.approx(adv_loss.item(), rel=1e-10)
    expected = (rec + 0.7 * kl).mean() / 256 + 0.5 * weight * adv_loss
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert not out["adaptive_weight"].requires_grad

    # The clamp: an adversarial term without gradient at the last layer gives ||grad L_rec|| / 1e-4.
    w = torch.tensor([3.0, 4.0], requires_grad=True)
    assert adaptive_weight((w ** 2).sum() / 1e4, 0 * w.sum(), w).item() == pytest.approx(1e-3 / 1e-4)
    assert adaptive_weight((w ** 2).sum(), 0 * w.sum(), w).item() == 1e4


def test_the_discriminator_phase_judges_the_autoencoder_phases_reconstruction_without_a_second_pass():
    """One autoencoder pass per training step: the discriminator phase scores the reconstruction the
    autoencoder phase made of the same batch (detached); any other batch gets a fresh one."""
    from stagediff.modules.gan import discriminator_loss

    model = tiny_model("l1", discriminator=True, disc_weight=0.5).train()
    decodes = []
    model.autoencoder.decoder.register_forward_hook(lambda *args: decodes.append(1))
    x = torch.rand(4, 1, 16, 16, dtype=torch.float64) * 2 - 1
    torch.manual_seed(3)
    model(x, phase="autoencoder")
    (_, x_hat) = model._last_reconstruction
    assert not x_hat.requires_grad and len(decodes) == 1
    terms = model(x, phase="discriminator")
    assert len(decodes) == 1  # no second autoencoder pass
    expected = discriminator_loss(model.discriminator(x).flatten(), model.discriminator(x_hat).flatten(), "hinge")
    assert torch.equal(terms["loss"], expected)
    model(x.clone(), phase="discriminator")  # not the batch the autoencoder saw: a fresh reconstruction
    assert len(decodes) == 2


def test_the_discriminator_is_idle_before_disc_start_and_steps_after(images, tmp_path):
    """The stage's schedule and groups, stepped as the one loop steps them: for disc_start = 2
    steps, no discriminator step and no adversarial term; from step 3, both."""
    config = parse_run_config(raw_config(tmp_path, images, {**ADVERSARIAL, "disc_start": 2}))
    stage = VAEStage(config.stages[0], load_data(config.data))
    model = stage.build_model()
    groups = stage.parameter_groups(model)
    assert list(groups) == ["autoencoder", "discriminator"]
    assert {id(p) for p in groups["discriminator"]} == {id(p) for p in model.discriminator.parameters()}
    grouped = [id(p) for params in groups.values() for p in params]  # the trainable ones, each once
    assert sorted(grouped) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    gaussian = parse_run_config(raw_config(tmp_path, images, {**ADVERSARIAL, "reconstruction": "gaussian"}))
    gaussian_stage = VAEStage(gaussian.stages[0], stage.data)
    gaussian_model = gaussian_stage.build_model()  # sigma_x^2 learned: it steps with the autoencoder
    learned = gaussian_stage.parameter_groups(gaussian_model)["autoencoder"]
    assert any(p is gaussian_model.decoder_log_var for p in learned)
    optimizers = {name: torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01) for name, params in groups.items()}
    x = stage.training_input(torch.stack([stage.data.train[i]["x"] for i in range(8)]))
    initial = [p.detach().clone() for p in model.discriminator.parameters()]

    def unchanged() -> bool:
        return all(torch.equal(p, q) for p, q in zip(model.discriminator.parameters(), initial))

    for step in (1, 2, 3):
        logged = {}
        for name in groups:
            if not stage.phase_due(name, step):
                continue
            terms = model(x, phase=name)
            terms["loss"].backward()
            optimizers[name].step()
            for optimizer in optimizers.values():
                optimizer.zero_grad(set_to_none=True)
            logged.update({f"{name}_{k}": v.item() for k, v in terms.items()})
        if step <= 2:
            assert "discriminator_loss" not in logged and unchanged(), step
            assert logged["autoencoder_adv_loss"] == 0 and logged["autoencoder_adaptive_weight"] == 0, step
        else:
            assert "discriminator_loss" in logged and not unchanged()
            assert logged["autoencoder_adv_loss"] != 0 and logged["autoencoder_adaptive_weight"] > 0
    assert int(model.num_steps) == 3


def test_a_run_with_the_discriminator_exports_a_stock_autoencoder_and_resumes(images, tmp_path):
    """Through the one loop: the discriminator's terms are logged from step disc_start + 1, the
    export is a stock `AutoencoderKL` alone (the discriminator stays in checkpoints), and a run
    resumed after disc_start steps ends with the weights of a straight one (the step count that
    switches the adversarial term on travels in the checkpoint)."""
    model = {**ADVERSARIAL, "disc_start": 2}
    straight = raw_config(tmp_path / "straight", images, model, lr_scheduler="constant", checkpointing_steps=3)
    metrics = train(straight)["vae"]
    stage_dir = tmp_path / "straight" / "vae"
    history = [json.loads(row) for row in (stage_dir / "history.jsonl").read_text().splitlines()]
    assert [row["step"] for row in history] == [1, 2, 3]
    for row in history[:2]:
        assert "discriminator_loss" not in row and row["autoencoder_adaptive_weight"] == 0
    assert math.isfinite(history[2]["discriminator_loss"]) and history[2]["autoencoder_adaptive_weight"] > 0
    assert {"discriminator_logits_real", "discriminator_logits_fake", "autoencoder_adv_loss"} <= set(history[2])
    vae = AutoencoderKL.from_pretrained(stage_dir / "vae")  # stock diffusers, no discriminator
    assert vae.config.scaling_factor == pytest.approx(metrics["scaling_factor"])
    # The final metrics score the exported autoencoder's posterior-mean reconstructions of the held-out split.
    x = torch.stack([item["x"] for item in load_data(parse_run_config(straight).data).validation])
    with torch.no_grad():
        x_hat = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    assert metrics["recon_psnr"] == pytest.approx(psnr(x_hat, x).mean().item(), abs=1e-3)
    assert metrics["recon_ssim"] == pytest.approx(ssim(x_hat, x).mean().item(), abs=1e-4)
    assert {"recon_swd", "recon_swd_16"} <= set(metrics) and metrics["recon_swd"] > 0
    assert {p.name for p in (stage_dir / "vae").iterdir()} == {"config.json", "diffusion_pytorch_model.safetensors"}
    assert not (stage_dir / "discriminator").exists()
    checkpointed = load_file(stage_dir / "checkpoints" / "checkpoint-3" / "model.safetensors")
    assert any(k.startswith("discriminator.") for k in checkpointed) and int(checkpointed["num_steps"]) == 3

    resumed = raw_config(tmp_path / "resumed", images, model, lr_scheduler="constant", max_steps=2,
                         checkpointing_steps=2)
    train(resumed)
    resumed["stages"][0]["training"].update(max_steps=3, resume_from_checkpoint="latest")
    train(resumed)
    assert exported_weights(tmp_path / "resumed" / "vae") == exported_weights(stage_dir)


def test_without_a_discriminator_the_stage_has_one_group(images, tmp_path):
    off = {"disc_weight": 0.0, "disc_start": 5, "disc_loss": "standard", "disc_channels": 4, "disc_layers": 9}
    for model_keys in ({}, off):  # the discriminator's other keys do nothing while it is off
        config = parse_run_config(raw_config(tmp_path, images, model_keys))
        stage = VAEStage(config.stages[0], load_data(config.data))
        model = stage.build_model()
        assert type(model) is GaussianVAE and list(stage.parameter_groups(model)) == ["model"]


# SHA-256 of the exported weights of `raw_config`'s 3-step default run, made by the code before the
# recipe (commit 17d85cd) with torch 2.13.0+cpu and diffusers 0.42.1, per CPU and ATen kernel set: the
# digests differ between kernel sets (ATEN_CPU_CAPABILITY) and between CPUs whose oneDNN/MKL kernels
# differ under the same kernel set (the real CPU's widest instructions), never between runs. The
# AVX2-only CPU's were recorded at commit 4545cf3, whose digests equal 17d85cd's on the AVX-512 CPU.
PRE_CHANGE_DIGESTS = {
    ("avx512_bf16", "DEFAULT"): "cb6365720eb97c7ab5dfd6777739472567c05ae401ccd95d799e9d174f7e6e1a",
    ("avx512_bf16", "AVX2"): "5760210f09f4e837cf67e6e90f3246e0022fa04f5c809f66d3d79cf91903d7e0",
    ("avx512_bf16", "AVX512"): "ec99e3445a55e9c23dd59c2964ce7a135b0009018832b0dd0c9dc03c99d88240",
    ("avx2", "DEFAULT"): "8607b6620c9bb657000873c9a04523229365e1653211f1a6a37475a7eabba84d",
    ("avx2", "AVX2"): "c65841b91e9ac91a1013a8b40f89ab424b06503ea0aaa9ab06f13b84214dced7",
}


def widest_cpu_instructions() -> str:
    """The real CPU's widest vector instructions, whatever ATEN_CPU_CAPABILITY asks of ATen."""
    if torch.cpu._is_avx512_bf16_supported():
        return "avx512_bf16"
    return "avx512" if torch.cpu._is_avx512_supported() else "avx2" if torch.cpu._is_avx2_supported() else "older"


@pytest.mark.numerics
def test_without_a_discriminator_a_3_step_run_ends_with_the_pre_change_weights(images, tmp_path):
    cpu = (widest_cpu_instructions(), torch.backends.cpu.get_cpu_capability())
    if (torch.__version__, diffusers.__version__) != ("2.13.0+cpu", "0.42.1") or cpu not in PRE_CHANGE_DIGESTS:
        pytest.skip(f"digests recorded for torch 2.13.0+cpu, diffusers 0.42.1 and (CPU, kernel set) in "
                    f"{list(PRE_CHANGE_DIGESTS)}, not {cpu}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as recorded: a parallel reduction may sum in another order
    try:
        train({**raw_config(tmp_path / "run", images), "device": "cpu"})
    finally:
        torch.set_num_threads(threads)
    weights = tmp_path / "run" / "vae" / "vae" / "diffusion_pytorch_model.safetensors"
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == PRE_CHANGE_DIGESTS[cpu]


@pytest.mark.parametrize("key, value", [
    ("reconstruction", "l3"), ("disc_weight", -0.1), ("disc_start", -1), ("disc_loss", "wgan"),
    ("disc_channels", 0), ("disc_layers", 0),
])
def test_bad_keys_are_refused_naming_them(images, tmp_path, key, value):
    with pytest.raises(ConfigError, match=rf"stages\.vae\.model\.{key}: "):
        parse_run_config(raw_config(tmp_path, images, {key: value}))


@pytest.mark.parametrize("model_keys, training, message", [
    ({"disc_layers": 3}, {}, r"stages\.vae\.model\.disc_layers: 3 stride-2 convs leave no patch of a 16x16 image"),
    ({}, {"gradient_accumulation_steps": 2}, r"stages\.vae\.training\.gradient_accumulation_steps: .* needs 1"),
])
def test_a_discriminator_that_does_not_fit_is_refused(images, tmp_path, model_keys, training, message):
    config = parse_run_config(raw_config(tmp_path, images, {**ADVERSARIAL, **model_keys}, **training))
    with pytest.raises(ValueError, match=message):
        VAEStage(config.stages[0], load_data(config.data))
