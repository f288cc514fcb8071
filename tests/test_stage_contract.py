"""The stage contract (pipelines/stages/base.py), checked on every registered kind: the cases
iterate `registry.STAGE_KINDS`, so a new family gets these tests by registering. Each kind builds
from its config; its loss is finite and backpropagates into each of its parameter groups; the one
loop trains it a few steps and exports it; the exported folder alone reloads and samples the data's
shape; and a run resumed from a checkpoint ends with the weights of a run that never stopped.

Every case is tiny. The `model:` block takes, of TINY_MODEL, the keys that the kind's
`model_config` has (its defaults for the rest). The data are 2D vectors (ring8) when the kind
accepts them, else a folder of 64 16x16 grayscale images (unlabelled, so no feature classifier is
trained to score them; mnist would cost seconds of CSV parsing per run); kinds that take an
`input:` stage also run on the latents of a tiny VAE.
"""

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from accelerate.utils import set_seed

from stagediff.modules.sr import downsample
from stagediff.pipelines.data import load_data
from stagediff.pipelines.diffusion import SuperResolutionPipeline
from stagediff.pipelines.registry import STAGE_KINDS, parse_run_config
from stagediff.pipelines.run import make_accelerator
from stagediff.pipelines.sampling import generate, resolve_stage_dir
from stagediff.pipelines.stage_folder import CHECKPOINTS_DIR, METRICS_FILE, exported_weights, read_history, read_json

from helpers import noise_image_folder
from reliability.helpers import copy_run, train

# Small sizes by knob name, for every kind whose model block has that knob.
TINY_MODEL = {
    "block_out_channels": [8, 16], "attention": [False, False], "norm_num_groups": 8, "latent_channels": 2,
    "num_train_timesteps": 50, "num_inference_steps": 2, "num_eval_samples": 16,
    "mlp_hidden": 16, "mlp_layers": 1,
    "num_scales": 1, "steps_per_scale": 2, "hidden_channels": 8, "num_blocks": 1,
    "latent_dim": 4, "hidden": 16, "num_layers": 1, "base_channels": 8, "max_channels": 16,
    "scale": 2,
}
# A constant learning rate: the first 2 of 4 steps do not depend on max_steps, so a 2-step run
# resumed to 4 must end where a straight 4-step run does. 48 training images in batches of 16:
# the resume lands mid-epoch, and the 4 steps cross an epoch.
TRAINING = {"max_steps": 4, "batch_size": 16, "learning_rate": 1e-3, "lr_scheduler": "constant", "log_every": 1}
VECTORS = {"source": "toy", "toy": "ring8", "toy_samples": 256}

CASES = [pytest.param((kind, False), id=kind) for kind in STAGE_KINDS] + [
    pytest.param((kind, True), id=f"{kind}-latent") for kind, stage_kind in STAGE_KINDS.items()
    if stage_kind.accepts_input]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict:
    return noise_image_folder(tmp_path_factory.mktemp("images"), 64)


def stage_block(kind: str, **training) -> dict:
    fields = {f.name for f in dataclasses.fields(STAGE_KINDS[kind].model_config)}
    return {"name": kind, "kind": kind, "model": {k: v for k, v in TINY_MODEL.items() if k in fields},
            "training": {**TRAINING, **training}}


def accepted_data(kind: str, images: dict) -> dict:
    """The cheapest data the kind accepts: its constructor refuses the others with a ValueError."""
    for data in (VECTORS, images):
        config = parse_run_config({"output_dir": "unused", "data": data, "stages": [stage_block(kind)]})
        try:
            STAGE_KINDS[kind](config.stages[0], load_data(config.data))
            return data
        except ValueError:
            continue
    raise AssertionError(f"a {kind} stage accepts neither 2D vectors nor 16x16 images")


@pytest.fixture(scope="module", params=CASES)
def case(request):
    """(kind, on the latents of a VAE)."""
    return request.param


@pytest.fixture(scope="module")
def base_run(case, images, tmp_path_factory) -> dict:
    """What a case's runs start from: a raw config with no stage yet (latent cases: a finished
    2-step VAE run on the images, whose latents the case's stage trains on)."""
    kind, on_latents = case
    if not on_latents:
        return {"output_dir": "unused", "seed": 0, "log_with": "none", "data": accepted_data(kind, images),
                "stages": []}
    raw = {"output_dir": str(tmp_path_factory.mktemp("vae") / "run"), "seed": 0, "log_with": "none",
           "data": images, "stages": [stage_block("vae", max_steps=2)]}
    train(raw)
    return raw


def run_config(case, base_run: dict, output_dir: Path, **training) -> dict:
    """The case's raw run config in a fresh folder (latent cases: a copy of the VAE run, whose stage
    is then skipped as done)."""
    kind, on_latents = case
    if on_latents:
        raw = copy_run(base_run, output_dir)
        return {**raw, "stages": [*raw["stages"], {**stage_block(kind, **training), "input": "vae"}]}
    return {**base_run, "output_dir": str(output_dir), "stages": [stage_block(kind, **training)]}


@pytest.fixture(scope="module")
def straight_run(case, base_run, tmp_path_factory) -> dict:
    """The raw config of the case trained 4 steps straight, without checkpoints."""
    raw = run_config(case, base_run, tmp_path_factory.mktemp("straight") / "run")
    train(raw)
    return raw


def test_builds_and_its_loss_backpropagates_into_every_parameter_group(case, base_run, tmp_path):
    kind, _ = case
    config = parse_run_config(run_config(case, base_run, tmp_path / "run"))
    stage_config = config.stages[-1]
    input_dir = Path(config.output_dir) / stage_config.input if stage_config.input else None
    stage = STAGE_KINDS[kind](stage_config, load_data(config.data), input_dir)
    stage.setup(make_accelerator(config), tmp_path / "run" / kind)  # e.g. caches the VAE's latents
    set_seed(0)
    model = stage.build_model()
    groups = stage.parameter_groups(model)
    grouped = [p for params in groups.values() for p in params]
    # The groups split the trainable parameters: none left out, none in two groups.
    assert {id(p) for p in grouped} == {id(p) for p in model.parameters() if p.requires_grad}
    assert len({id(p) for p in grouped}) == len(grouped)
    # What the Accelerator is told before any stage is built (DDP's find_unused_parameters).
    assert (len(groups) > 1) == type(stage).several_parameter_groups(stage_config.model)

    x = stage.training_input(torch.stack([stage.data.train[i]["x"] for i in range(8)]))
    for name, params in groups.items():
        model.zero_grad(set_to_none=True)
        terms = model(x) if len(groups) == 1 else model(x, phase=name)
        assert terms["loss"].shape == () and torch.isfinite(terms["loss"]), (name, terms["loss"])
        terms["loss"].backward()
        missing = [i for i, p in enumerate(params) if p.grad is None]
        assert not missing, f"group {name!r}: its loss leaves parameters {missing} without a gradient"
        assert all(torch.isfinite(p.grad).all() for p in params), name
        assert any(p.grad.abs().sum() > 0 for p in params), name


def test_trains_exports_reloads_and_samples_the_datas_shape(case, straight_run):
    kind, _ = case
    stage_dir = Path(straight_run["output_dir"]) / kind
    history = read_history(stage_dir)
    assert [row["step"] for row in history] == [1, 2, 3, 4]
    assert all(math.isfinite(v) for row in history for k, v in row.items() if k.endswith("loss"))
    assert read_json(stage_dir, METRICS_FILE)

    stage_dir, stage_kind = resolve_stage_dir(stage_dir)  # checks the weights against done.json
    assert stage_kind is STAGE_KINDS[kind]
    data = load_data(parse_run_config(straight_run).data)
    if stage_kind.evaluation_task == "sr":  # it samples high-resolution images of low-resolution ones
        pipe = SuperResolutionPipeline.from_pretrained(stage_dir)
        high_res = torch.stack([data.validation[i]["x"] for i in range(3)])  # (3, C, H, W)
        low_res = downsample(high_res, pipe.config.scale)

        def sample():
            return pipe(low_res, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                        output_type="pt").images

        expected_shape = high_res.shape
    else:
        def sample():  # the stage's default sampler, as `stagediff sample` draws
            return generate(stage_dir, 3, seed=0, device="cpu")

        expected_shape = (3, *data.sample_shape)
    samples = sample()
    assert samples.shape == expected_shape and torch.isfinite(samples).all()
    assert torch.equal(sample(), samples)  # the folder and the seed alone make the samples


def test_a_resumed_run_ends_with_the_weights_of_a_straight_run(case, base_run, straight_run, tmp_path):
    kind, _ = case
    raw = run_config(case, base_run, tmp_path / "run", max_steps=2, checkpointing_steps=2)
    train(raw)
    stage_dir = tmp_path / "run" / kind
    assert [p.name for p in (stage_dir / CHECKPOINTS_DIR).iterdir()] == ["checkpoint-2"]
    raw["stages"][-1]["training"].update(max_steps=4, resume_from_checkpoint="latest")
    train(raw)
    assert [row["step"] for row in read_history(stage_dir)] == [1, 2, 3, 4]
    assert exported_weights(stage_dir) == exported_weights(Path(straight_run["output_dir"]) / kind)
