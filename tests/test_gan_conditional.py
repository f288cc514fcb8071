"""The class-conditional GAN (issue 16): a generator with a class embedding, the projection
discriminator of Miyato & Koyama 2018, and the labels' way through the one training loop, the
exported generator, `stagediff sample` and the evaluation; errors name what is wrong.

The trained model learns two classes of 8x8 images, all black ("dark", class 0) and all white
("light", class 1): a sample's class is the sign of its mean pixel. A generator that ignored the
labels would draw each class with the same probability whatever the label asked."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stagediff.modules.gan import Discriminator, GANTrainingModule, Generator
from stagediff.pipelines.cli import main
from stagediff.pipelines.data import load_data
from stagediff.pipelines.registry import parse_run_config
from stagediff.pipelines.sampling import generate
from stagediff.pipelines.stages.gan import GANStage

from helpers import class_image_folder, dark_and_light, noise_image_folder
from reliability.helpers import train

pytestmark = pytest.mark.usefixtures("single_thread")

K = 3  # classes of the untrained networks below
TWO_CLASS_MODEL = {"latent_dim": 8, "base_channels": 16, "max_channels": 16, "generator_norm": "batch",
                   "num_eval_samples": 64, "class_conditional": True}
IMAGES_PER_CLASS = 64


def two_class_config(output_dir: Path, data: dict, **model) -> dict:
    return {"output_dir": str(output_dir), "seed": 0, "log_with": "none", "data": data,
            "stages": [{"name": "gan", "kind": "gan", "model": {**TWO_CLASS_MODEL, **model},
                        "training": {"max_steps": 150, "batch_size": 32, "learning_rate": 2e-3, "adam_beta1": 0.5,
                                     "lr_scheduler": "constant", "max_grad_norm": None, "log_every": 50}}]}


@pytest.fixture(scope="module")
def two_class_run(tmp_path_factory) -> tuple[dict, dict]:
    """The raw config of a class-conditional GAN trained briefly on the two classes, and its metrics."""
    root = tmp_path_factory.mktemp("two_classes")
    raw = two_class_config(root / "run", class_image_folder(root / "images", dark_and_light(IMAGES_PER_CLASS)))
    return raw, train(raw)["gan"]


@pytest.fixture(scope="module")
def stage_dir(two_class_run) -> Path:
    return Path(two_class_run[0]["output_dir"]) / "gan"


def signs(images: torch.Tensor) -> torch.Tensor:
    """(B,) +1 for a light image, -1 for a dark one."""
    return images.flatten(1).mean(1).sign()


# --------------------------------------------------------------------------------- networks


@pytest.mark.numerics
def test_the_projection_discriminator_is_psi_of_phi_plus_the_class_embedding_dot_phi():
    """l(x, c) = psi(phi(x)) + <embed(c), phi(x)> (Miyato & Koyama 2018, eq. 3), recomputed in
    float64 from the weights; an unlabelled datum (-1) gets psi(phi(x)) alone."""
    torch.manual_seed(0)
    network = Discriminator(sample_shape=(3,), hidden=5, num_layers=2, num_classes=K).double()
    x, labels = torch.randn(6, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 2, 1, -1])
    (w1, b1), (w2, b2), (w3, b3) = ((layer.weight, layer.bias) for layer in network.net if hasattr(layer, "weight"))
    phi = torch.nn.functional.leaky_relu(torch.nn.functional.leaky_relu(x @ w1.T + b1, 0.2) @ w2.T + b2, 0.2)
    psi = (phi @ w3.T + b3).squeeze(1)
    embed = network.class_embedding.weight
    expected = psi + torch.stack([embed[c] @ phi[i] if c >= 0 else phi.new_zeros(()) for i, c in enumerate(labels)])
    with torch.no_grad():
        # Tolerance: a few ulps of float64 per term of these 5-wide sums.
        torch.testing.assert_close(network(x, labels), expected, rtol=1e-12, atol=1e-12)
        assert not torch.allclose(network(x, labels.roll(1)), expected)  # the class matters

    images = Discriminator(sample_shape=(1, 8, 8), base_channels=4, max_channels=8, num_classes=K,
                           spectral_norm=True).eval()
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        phi = images.net[:-1](x)  # (4, 8 * 16): the flattened 4x4 features
        expected = images.net[-1](phi).squeeze(1) + (images.class_embedding.weight[[0, 2, 1, 0]] * phi).sum(1)
        torch.testing.assert_close(images(x, torch.tensor([0, 2, 1, 0])), expected)


def test_the_conditional_generators_output_depends_on_the_label():
    torch.manual_seed(0)
    network = Generator(sample_shape=(1, 8, 8), latent_dim=4, base_channels=8, max_channels=8, num_classes=K).eval()
    z = torch.randn(1, 4).expand(K, 4)  # one z, every class
    with torch.no_grad():
        x = network(z, torch.arange(K))
        assert torch.equal(network(z, torch.arange(K)), x)
    assert x.shape == (K, 1, 8, 8)
    differences = (x[:, None] - x[None]).abs().flatten(2).amax(2)  # (K, K) largest pixel difference
    assert (differences + torch.eye(K) > 1e-3).all()  # every pair of classes differs
    with pytest.raises(ValueError, match=r"class_labels must be given exactly when the network is "
                                         r"class-conditional \(num_classes=3\); got none"):
        network(z)
    with pytest.raises(ValueError, match=r"the generator's num_classes \(3\) and the discriminator's \(None\) differ"):
        GANTrainingModule(network, Discriminator(sample_shape=(1, 8, 8), base_channels=8, max_channels=8))


def test_fakes_take_the_real_batchs_classes_and_a_drawn_class_where_it_is_unlabelled():
    torch.manual_seed(0)
    module = GANTrainingModule(Generator(sample_shape=(2,), latent_dim=2, hidden=4, num_layers=1, num_classes=K),
                               Discriminator(sample_shape=(2,), hidden=4, num_layers=1, num_classes=K))
    labels = torch.tensor([2, -1, 0, -1] * 50)
    fakes = module.fake_labels(labels)
    assert torch.equal(fakes[labels >= 0], labels[labels >= 0])
    assert set(fakes[labels < 0].tolist()) == set(range(K))  # 100 uniform draws: each class is there
    terms = module(torch.randn(len(labels), 2), phase="generator", class_labels=labels)
    terms["loss"].backward()
    assert module.generator.class_embedding.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------------- a trained model


@pytest.mark.numerics
def test_a_briefly_trained_conditional_gan_draws_the_requested_class(stage_dir):
    """At least 28 of 32 samples of each class (measured: 32 of 32 under ATEN_CPU_CAPABILITY
    default, avx2 and avx512); a generator that ignored the labels, drawing light with the same
    probability p for both requests, passes with probability at most ~1e-10 (p = 1/2)."""
    for label, sign in ((0, -1), (1, 1)):
        samples = generate(stage_dir, 32, seed=0, class_label=label, device="cpu")
        right = int((signs(samples) == sign).sum())
        assert right >= 28, (label, right)


def test_training_evaluates_conditional_accuracy_and_previews_a_row_per_class(two_class_run, stage_dir):
    _, metrics = two_class_run
    # The feature classifier on the data's own images tells black from white; >= 0.9 of the 64
    # balanced evaluation samples (measured 1.0 under the three kernel sets).
    assert metrics["conditional_accuracy"] >= 0.9 and metrics["fd_per_class"] >= 0
    assert Image.open(stage_dir / "samples.png").size == (8 * 12, 2 * 12)  # 8 columns, a row per class (2 px pads)


def test_the_exported_generator_records_k_and_round_trips_labels(stage_dir, tmp_path):
    assert GANStage.num_classes(stage_dir) == 2
    network = Generator.from_pretrained(stage_dir / "generator")
    assert network.config.num_classes == 2 and Discriminator.load_config(stage_dir / "discriminator")["num_classes"] == 2
    network.save_pretrained(tmp_path / "generator")
    labels = torch.tensor([0, 1, 1, 0])

    def draw(folder):
        return GANStage.sample(folder, 4, torch.Generator().manual_seed(0), torch.device("cpu"), class_labels=labels)

    first = draw(stage_dir)
    assert torch.equal(first, draw(stage_dir))
    assert torch.equal(signs(first), torch.tensor([-1.0, 1.0, 1.0, -1.0]))
    reloaded = Generator.from_pretrained(tmp_path / "generator").eval()
    with torch.no_grad():
        again = reloaded.sample(4, torch.Generator().manual_seed(0), class_labels=labels).clamp(-1, 1)
    assert torch.equal(again, first)


def test_stagediff_sample_draws_a_class_and_by_default_a_grid_row_per_class(stage_dir, tmp_path):
    main(["sample", str(stage_dir), "--n", "4", "--class", "1", "--out", str(tmp_path / "light")])
    light = [np.asarray(Image.open(tmp_path / "light" / f"{i:05d}.png")) for i in range(4)]
    assert all(image.mean() > 127.5 for image in light)
    main(["sample", str(stage_dir), "--n", "5", "--out", str(tmp_path / "balanced")])
    assert Image.open(tmp_path / "balanced" / "grid.png").size == (3 * 12, 2 * 12)  # classes 0, 1: 3 and 2 samples


# --------------------------------------------------------------------------------- errors


def test_a_class_outside_0_to_k_minus_1_names_k(stage_dir):
    with pytest.raises(ValueError, match=r"class label\(s\) \[2\] outside 0\.\.1: the model has K = 2 classes"):
        GANStage.sample(stage_dir, 2, torch.Generator().manual_seed(0), torch.device("cpu"),
                        class_labels=torch.tensor([0, 2]))
    with pytest.raises(SystemExit, match=r"stagediff sample: error: class label\(s\) \[-1\] outside 0\.\.1: .*K = 2"):
        main(["sample", str(stage_dir), "--n", "2", "--class", "-1"])


def test_guidance_on_a_gan_is_refused(stage_dir):
    with pytest.raises(ValueError, match=r"guidance_scale=3.0 .*: a GAN has no classifier-free guidance"):
        GANStage.sample(stage_dir, 2, torch.Generator().manual_seed(0), torch.device("cpu"), guidance_scale=3.0)
    with pytest.raises(SystemExit, match=r"stagediff sample: error: guidance_scale=2.0 .*a GAN has no "
                                         r"classifier-free guidance"):
        main(["sample", str(stage_dir), "--n", "2", "--class", "1", "--guidance-scale", "2"])


def test_class_conditional_on_unlabelled_data_names_the_key_and_the_data(tmp_path):
    block = {"name": "gan", "kind": "gan", "model": TWO_CLASS_MODEL,
             "training": {"lr_scheduler": "constant"}}
    for data, what in ((noise_image_folder(tmp_path, 8), rf"imagefolder {tmp_path}: .* has no class labels"),
                       ({"source": "toy", "toy": "ring8", "toy_samples": 16}, "toy ring8: .* has 2-D vectors")):
        config = parse_run_config({"output_dir": str(tmp_path / "run"), "data": data, "stages": [block]})
        with pytest.raises(ValueError, match=rf"stages\.gan\.model\.class_conditional: true needs labelled images, "
                                             rf"and the data \({what}"):
            GANStage(config.stages[0], load_data(config.data))
