"""Class-conditional DDPMs (issue 16): label dropout to the null class in training, classifier-free
guidance in sampling (Ho & Salimans 2022), and the labels' way through the one training loop, the
exported pipelines, `stagediff sample` and the model card; errors name what is wrong.

The trained model learns two classes of 8x8 images, all black ("dark", class 0) and all white
("light", class 1): a sample's class is the sign of its mean pixel. A sampler that ignored the
labels would draw each class half of the time."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import AutoencoderKL, DDPMScheduler
from diffusers.models.unets.unet_2d import UNet2DOutput
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from torch import nn

from stagediff.benchmarks.report import check_targets
from stagediff.benchmarks.sampling import measure_samplers
from stagediff.modules.ddpm import EpsilonPredictionLoss
from stagediff.pipelines.cli import main
from stagediff.pipelines.config import ConfigError
from stagediff.pipelines.data import load_data
from stagediff.pipelines.diffusion import (SAMPLERS, ImageDiffusionPipeline, LatentDiffusionPipeline, denoise,
                                           make_sampler)
from stagediff.pipelines.evaluation import conditional_metrics
from stagediff.pipelines.hub import build_upload_folder
from stagediff.pipelines.registry import parse_run_config
from stagediff.pipelines.sampling import generate
from stagediff.pipelines.stages.ddpm import DDPMModelConfig, DDPMStage

from helpers import class_image_folder, dark_and_light, noise_image_folder
from reliability.helpers import toy_ddpm_config, train

pytestmark = pytest.mark.usefixtures("single_thread")

K = 3  # classes of the untrained networks below; their class embedding has K + 1 rows (the null class K)
UNET = DDPMModelConfig(block_out_channels=[8, 16], attention=[False, False], norm_num_groups=8)
# v-prediction: the class is decided at high noise, where v's target is about -x_0 while eps's
# barely depends on x_0; with eps the same 200 steps left up to half the samples of the wrong class.
TWO_CLASS_MODEL = {"block_out_channels": [16, 16], "attention": [False, False], "norm_num_groups": 8,
                   "num_train_timesteps": 100, "beta_schedule": "cosine", "prediction_type": "v_prediction",
                   "num_inference_steps": 10, "num_eval_samples": 16, "class_conditional": True,
                   "cond_drop_prob": 0.2, "guidance_scale": 3.0}
IMAGES_PER_CLASS = 64


def two_class_config(output_dir: Path, data: dict, **model) -> dict:
    return {"output_dir": str(output_dir), "seed": 0, "log_with": "none", "data": data,
            "stages": [{"name": "ddpm", "kind": "ddpm", "model": {**TWO_CLASS_MODEL, **model},
                        "training": {"max_steps": 200, "batch_size": 32, "learning_rate": 5e-3,
                                     "lr_scheduler": "constant", "log_every": 50}}]}


@pytest.fixture(scope="module")
def two_class_run(tmp_path_factory) -> dict:
    """The raw config of a class-conditional pixel DDPM trained 200 steps on the two classes."""
    root = tmp_path_factory.mktemp("two_classes")
    raw = two_class_config(root / "run", class_image_folder(root / "images", dark_and_light(IMAGES_PER_CLASS)))
    train(raw)
    return raw


@pytest.fixture(scope="module")
def stage_dir(two_class_run) -> Path:
    return Path(two_class_run["output_dir"]) / "ddpm"


def signs(images: torch.Tensor) -> torch.Tensor:
    """(B,) +1 for a light image, -1 for a dark one."""
    return images.flatten(1).mean(1).sign()


# --------------------------------------------------------------------------------- training


def test_label_dropout_replaces_labels_by_the_null_class_at_the_configured_rate():
    torch.manual_seed(0)
    unet = UNET.make_unet(8, 1, 1, num_class_embeds=K + 1)
    seen = []  # the labels the class embedding looks up
    unet.class_embedding.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].clone()))
    loss = EpsilonPredictionLoss(unet, DDPMScheduler(num_train_timesteps=100), cond_drop_prob=0.2)
    labels = torch.arange(2000) % K
    x = torch.zeros(len(labels), 1, 8, 8)
    with torch.no_grad():
        loss(x, labels)  # training: labels dropped
        loss.per_example_loss(x, labels)  # validation: labels as given
    dropped = seen[0] != labels
    assert (seen[0][dropped] == K).all()  # every dropped label became the null class K
    # 2000 Bernoulli(0.2) draws: 4 binomial standard deviations (0.036) apart from 0.2 at most.
    assert abs(dropped.float().mean().item() - 0.2) < 4 * math.sqrt(0.2 * 0.8 / len(labels))
    assert torch.equal(seen[1], labels)


def test_unlabelled_items_of_a_labelled_set_train_the_null_class(two_class_run):
    config = parse_run_config(two_class_run)
    stage = DDPMStage(config.stages[0], load_data(config.data))
    assert stage.data.num_classes == 2
    conditioning = stage.conditioning(torch.tensor([0, -1, 1]))
    assert torch.equal(conditioning["class_labels"], torch.tensor([0, 2, 1]))


# --------------------------------------------------------------------------------- guidance


class Oracle(nn.Module):
    """A network with known predictions, eps(z_t, t, c) = z_t / 2 + table[c] (c = K: the null
    class), that records the labels of every call."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.tensor([0.3, -0.5, 1.2, 0.1]))  # K classes, then the null class
        self.config = {"num_class_embeds": K + 1}
        self.calls = []

    def forward(self, sample, timestep, class_labels):
        self.calls.append(class_labels)
        return UNet2DOutput(sample=sample / 2 + self.table[class_labels].view(-1, 1, 1, 1))


@pytest.mark.numerics
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_guidance_steps_with_the_guided_prediction_from_one_call_of_batch_2b(sampler, prediction_type):
    """eps~ = eps(null) + w (eps(c) - eps(null)) reaches the scheduler at every step, from one
    network call on [z_t; z_t] with labels [c; null]."""
    scheduler = make_sampler(sampler, DDPMScheduler(num_train_timesteps=100, prediction_type=prediction_type,
                                                    clip_sample=True).config)
    stepped = []  # (model output, z_t) of every step
    step = scheduler.step
    scheduler.step = lambda output, t, z, **options: stepped.append((output, z)) or step(output, t, z, **options)
    oracle, labels, w = Oracle(), torch.tensor([2, 0, 1, 2]), 3.0
    with torch.no_grad():
        table = oracle.table.clone()
        denoise(oracle, scheduler, (4, 1, 8, 8), 5, torch.Generator().manual_seed(0), "cpu", class_labels=labels,
                guidance_scale=w)
    assert len(oracle.calls) == len(stepped) == len(scheduler.timesteps)
    assert all(torch.equal(call, torch.tensor([2, 0, 1, 2, K, K, K, K])) for call in oracle.calls)
    for output, z in stepped:
        expected = z / 2 + table[K] + w * (table[labels] - table[K]).view(-1, 1, 1, 1)
        torch.testing.assert_close(output, expected)


@pytest.mark.numerics
def test_guidance_scale_one_is_the_conditional_model_alone_bit_for_bit():
    torch.manual_seed(0)
    unet = UNET.make_unet(8, 1, 1, num_class_embeds=K + 1).eval()
    batch_sizes = []
    unet.register_forward_pre_hook(lambda module, args: batch_sizes.append(len(args[0])))
    labels, shape = torch.tensor([0, 1, 2, 1]), (4, 1, 8, 8)
    scheduler = make_sampler("dpmsolver", DDPMScheduler(num_train_timesteps=100).config)

    def guided(w):
        return denoise(unet, scheduler, shape, 5, torch.Generator().manual_seed(0), "cpu", class_labels=labels,
                       guidance_scale=w)

    unguided = guided(1.0)
    assert batch_sizes == [4] * 5  # no null-class batch at w = 1
    with torch.no_grad():  # the conditional model, stepped by hand
        scheduler.set_timesteps(5)
        generator = torch.Generator().manual_seed(0)
        z = randn_tensor(shape, generator=generator) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            z = scheduler.step(unet(z, t, class_labels=labels).sample, t, z, generator=generator).prev_sample
    assert torch.equal(unguided, z)
    assert not torch.allclose(guided(2.0), unguided)


# --------------------------------------------------------------------------------- a trained model


@pytest.mark.numerics
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_a_briefly_trained_model_draws_the_requested_class(stage_dir, sampler):
    """At least 28 of 32 samples of each class, unguided and guided, with every sampler (measured:
    32 of 32 everywhere); a sampler that ignored the labels passes with probability ~1e-5."""
    steps = None if sampler == "ddpm" else 10
    for w in (1.0, 3.0):
        for label, sign in ((0, -1), (1, 1)):
            samples = generate(stage_dir, 32, seed=0, sampler=sampler, steps=steps, class_label=label,
                               guidance_scale=w, device="cpu")
            right = int((signs(samples) == sign).sum())
            assert right >= 28, (sampler, w, label, right)


def test_training_exports_our_pipeline_and_previews_a_row_per_class(stage_dir):
    assert ImageDiffusionPipeline.load_config(stage_dir)["_class_name"] == "ImageDiffusionPipeline"
    pipe = ImageDiffusionPipeline.from_pretrained(stage_dir)
    assert pipe.num_classes == 2 and pipe.unet.config.num_class_embeds == 3  # K classes + the null class
    assert Image.open(stage_dir / "samples.png").size == (8 * 12, 2 * 12)  # 8 columns, a row per class (2 px pads)


def test_pipelines_round_trip_labels(stage_dir, tmp_path):
    def draw(pipe):
        return pipe(batch_size=4, num_inference_steps=5, generator=torch.Generator().manual_seed(0),
                    class_labels=[0, 1, 1, 0], guidance_scale=2.0, output_type="pt").images

    pixels = ImageDiffusionPipeline.from_pretrained(stage_dir)
    pixels.save_pretrained(tmp_path / "pixels")
    assert torch.equal(draw(ImageDiffusionPipeline.from_pretrained(tmp_path / "pixels")), draw(pixels))

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=(8, 16), latent_channels=2,
                        norm_num_groups=8, sample_size=16, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2).eval()  # as from_pretrained leaves it
    unet = UNET.make_unet(8, 2, 2, num_class_embeds=K + 1).eval()
    latent = LatentDiffusionPipeline(vae, unet, DDPMScheduler(100))
    latent.save_pretrained(tmp_path / "latent")
    reloaded = LatentDiffusionPipeline.from_pretrained(tmp_path / "latent")
    assert reloaded.num_classes == K
    images = draw(reloaded)
    assert images.shape == (4, 1, 16, 16) and torch.equal(images, draw(latent))
    other_labels = reloaded(batch_size=4, num_inference_steps=5, generator=torch.Generator().manual_seed(0),
                            class_labels=[2, 2, 2, 2], guidance_scale=2.0, output_type="pt").images
    assert not torch.equal(images, other_labels)


def test_stagediff_sample_draws_a_class_and_by_default_a_grid_row_per_class(stage_dir, tmp_path):
    main(["sample", str(stage_dir), "--n", "4", "--steps", "10", "--class", "1", "--guidance-scale", "3",
          "--out", str(tmp_path / "light")])
    light = [np.asarray(Image.open(tmp_path / "light" / f"{i:05d}.png")) for i in range(4)]
    assert all(image.mean() > 127.5 for image in light)
    main(["sample", str(stage_dir), "--n", "5", "--steps", "2", "--out", str(tmp_path / "balanced")])
    assert Image.open(tmp_path / "balanced" / "grid.png").size == (3 * 12, 2 * 12)  # classes 0, 1: 3 and 2 samples


@pytest.mark.numerics
def test_the_model_cards_snippet_draws_a_class(stage_dir, tmp_path):
    build_upload_folder(stage_dir, "someone/two-classes", tmp_path / "up")
    card = (tmp_path / "up" / "README.md").read_text()
    load = re.findall(r"```python\n(.*?)```", card, flags=re.S)[0]
    assert "ImageDiffusionPipeline.from_pretrained" in load and "class_labels=1, guidance_scale=3.0" in load
    scope = {}
    exec(load.replace("someone/two-classes", str(tmp_path / "up")), scope)
    assert sum(np.asarray(image).mean() > 127.5 for image in scope["images"]) >= 14  # measured 16 of 16


def test_the_model_cards_snippet_uses_the_stages_guidance_scale(stage_dir, tmp_path):
    """The card shows the w the stage was evaluated at (the run's `guidance_scale`), not a constant."""
    block = yaml.safe_load((stage_dir / "config.yaml").read_text())["stages"][0]
    block["model"]["guidance_scale"] = 1.75
    assert "class_labels=1, guidance_scale=1.75)" in DDPMStage.card_pipeline_lines(stage_dir, block)[0]


# --------------------------------------------------------------------------------- errors


def test_a_class_outside_0_to_k_minus_1_names_k(stage_dir):
    pipe = ImageDiffusionPipeline.from_pretrained(stage_dir)
    with pytest.raises(ValueError, match=r"class label\(s\) \[2\] outside 0\.\.1: the model has K = 2 classes"):
        pipe(batch_size=2, class_labels=[0, 2])
    with pytest.raises(ValueError, match="2 labels for 3 samples"):
        pipe(batch_size=3, class_labels=[0, 1])
    with pytest.raises(SystemExit, match=r"stagediff sample: error: class label\(s\) \[-1\] outside 0\.\.1: .*K = 2"):
        main(["sample", str(stage_dir), "--n", "2", "--class", "-1"])


def test_class_or_guidance_on_an_unconditional_model_is_refused(tmp_path):
    raw = toy_ddpm_config(tmp_path / "run", max_steps=1)
    train(raw)
    folder = str(tmp_path / "run" / "ddpm")
    for option in (["--guidance-scale", "3"], ["--class", "1"]):
        with pytest.raises(SystemExit, match=r"labels and guidance need a class-conditional model; this one is "
                                             r"unconditional \(trained without model.class_conditional: true\)"):
            main(["sample", folder, "--n", "2", *option])


def test_class_conditional_on_unlabelled_data_names_the_key_and_the_data(tmp_path):
    block = {"name": "ddpm", "kind": "ddpm", "model": {**TWO_CLASS_MODEL, "guidance_scale": 1.0}}
    for data, what in ((noise_image_folder(tmp_path, 8), rf"imagefolder {tmp_path}: .* has no class labels"),
                       ({"source": "toy", "toy": "ring8", "toy_samples": 16}, "toy ring8: .* has 2-D vectors")):
        config = parse_run_config({"output_dir": str(tmp_path / "run"), "data": data, "stages": [block]})
        with pytest.raises(ValueError, match=rf"stages\.ddpm\.model\.class_conditional: true needs labelled images, "
                                             rf"and the data \({what}"):
            DDPMStage(config.stages[0], load_data(config.data))


@pytest.mark.parametrize("model, message", [
    ({"guidance_scale": 3.0}, "guidance_scale: 3.0 needs class_conditional: true and cond_drop_prob > 0"),
    ({"class_conditional": True, "cond_drop_prob": 0.0, "guidance_scale": 3.0}, "cond_drop_prob > 0"),
    ({"class_conditional": True, "cond_drop_prob": 1.0}, r"cond_drop_prob: 1.0 is not valid; expected a probability"),
])
def test_guidance_config_errors_name_the_key(model, message):
    with pytest.raises(ConfigError, match=message):
        parse_run_config({"data": {"source": "toy"}, "stages": [{"name": "ddpm", "kind": "ddpm", "model": model}]})


# --------------------------------------------------------------------------------- metrics


def test_conditional_metrics_score_samples_against_their_requested_classes(two_class_run):
    data = load_data(parse_run_config(two_class_run).data)
    images = torch.stack([item["x"] for item in data.validation])
    labels = torch.stack([item["label"] for item in data.validation])
    right = conditional_metrics(images, labels, data, "cpu")
    wrong = conditional_metrics(images, 1 - labels, data, "cpu")  # every image requested as the other class
    assert right["conditional_accuracy"] == 1.0 and wrong["conditional_accuracy"] == 0.0
    # Each class's images against the train split's images of the same class: identical images,
    # a distance of zero up to round-off; against the other class's, a distance between the classes.
    assert right["fd_per_class"] < 1e-3 * wrong["fd_per_class"]


def test_training_and_evaluate_report_conditional_accuracy_and_sweep_guidance(two_class_run, stage_dir, tmp_path,
                                                                             capsys):
    metrics = json.loads((stage_dir / "metrics.json").read_text())
    assert metrics["conditional_accuracy"] >= 0.9 and "fd_per_class" in metrics  # balanced labels, w = 3
    out = tmp_path / "sweep.json"
    main(["evaluate", str(stage_dir), "--n", "16", "--steps", "10", "--guidance-scale", "1", "3", "--out", str(out)])
    reports = json.loads(out.read_text())
    assert [r["guidance_scale"] for r in reports] == [1.0, 3.0]
    assert all(r["mean"]["conditional_accuracy"] >= 0.85 for r in reports)
    assert Image.open(out.with_suffix(".png")).size[0] > 100  # FD against accuracy, a point per w
    assert "| guidance w | conditional_accuracy | fd | fd_per_class" in capsys.readouterr().out


def test_benchmark_measures_guided_sampling_against_unguided(stage_dir):
    report = measure_samplers(stage_dir, 8, 0, "cpu")
    guided, unguided = report["guided"], report["results"][-1]
    assert guided["guidance_scale"] == 3.0 and (unguided["sampler"], unguided["steps"]) == ("dpmsolver", 20)
    assert guided["time_vs_unguided"] == pytest.approx(
        guided["sampling_seconds_per_sample"] / unguided["sampling_seconds_per_sample"])  # pixels: nothing decoded
    assert guided["conditional_accuracy"] >= 0.75 and unguided["conditional_accuracy"] >= 0.75
    benchmark = {"settings": {"headline_precision": "fp32"}, "speedup_vs_baseline": {"fp32": 2.5},
                 "flops": {"fraction_of_peak": 0.5}, "data_pipeline": {"latent": {"loader_to_step_ratio": 3}},
                 "sampling": report}  # the rest of a benchmark's report, as check_targets reads it
    targets = {t["target"]: t for t in check_targets(benchmark)}
    assert targets["guided (w = 3) vs unguided DPM-Solver++ 20 time per sample, denoising"]["measured"] == \
        guided["time_vs_unguided"]
