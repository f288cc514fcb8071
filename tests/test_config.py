"""One schema validates every run: errors name the key and what would be valid."""

from pathlib import Path

import pytest
import yaml

from stagediff.pipelines.config import ConfigError, config_to_dict, save_config
from stagediff.pipelines.registry import load_config, parse_run_config
from stagediff.pipelines.registry import get_stage_kind
from stagediff.pipelines.data import load_data

from helpers import tiny_vae_config

CONFIGS = sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.yaml"))


def write(tmp_path, raw) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c["stages"][0]["training"].update(max_stpes=3), r"stages\.vae\.training\.max_stpes: unknown key \(did you mean 'max_steps'\?\); valid keys: max_steps, batch_size"),
    (lambda c: c.update(sede=1), r"sede: unknown key \(did you mean 'seed'\?\)"),
    (lambda c: c["stages"][0]["model"].update(latent_chanels=4), r"stages\.vae\.model\.latent_chanels: unknown key.*valid keys: block_out_channels"),
    (lambda c: c["stages"][0]["training"].update(batch_size="big"), r"stages\.vae\.training\.batch_size: expected int, got 'big'"),
    (lambda c: c["stages"][0]["training"].update(learning_rate=-1.0), r"stages\.vae\.training\.learning_rate: -1\.0 is not valid; expected a number > 0"),
    (lambda c: c["stages"][0].update(kind="vea"), r"stages\.vae\.kind: unknown stage kind 'vea'; known kinds: vae, ddpm, flow, gan"),
    (lambda c: c.update(mixed_precision="fp8"), r"mixed_precision: 'fp8' is not one of \['auto', 'no', 'fp16', 'bf16'\]"),
    (lambda c: c["data"].update(resolution=0), r"data\.resolution=0 is invalid"),
    (lambda c: c["stages"][0]["model"].update(block_out_channels=[8, 12]), r"stages\.vae\.model\.norm_num_groups: 8 does not divide the widths \[12\]"),
    (lambda c: c.update(stages=[]), r"stages: expected a non-empty list"),
])
def test_config_errors_name_the_key(tmp_path, mutate, message):
    raw = tiny_vae_config(tmp_path)
    mutate(raw)
    with pytest.raises(ConfigError, match=message) as err:
        load_config(write(tmp_path, raw))
    assert str(tmp_path / "run.yaml") in str(err.value)  # and the file


def test_malformed_yaml_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("stages: [\n  - name: vae\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: not valid YAML"):
        load_config(path)


def test_overrides_keep_types_and_address_stages_by_name(tmp_path):
    path = write(tmp_path, tiny_vae_config(tmp_path))
    config = load_config(path, ["stages.vae.training.max_steps=7", "stages.vae.training.learning_rate=3e-4",
                                "stages.vae.model.block_out_channels=[8, 8]", "seed=3", "data.random_flip=true"])
    stage = config.stage("vae")
    assert (stage.training.max_steps, stage.training.learning_rate, config.seed) == (7, 3e-4, 3)
    assert stage.model.block_out_channels == [8, 8] and config.data.random_flip is True
    with pytest.raises(ConfigError, match=r"no stage named 'unet'; stages are \['vae'\]"):
        load_config(path, ["stages.unet.training.max_steps=1"])
    with pytest.raises(ConfigError, match=r"stages\.vae\.training\.max_step: unknown key"):
        load_config(path, ["stages.vae.training.max_step=1"])


def test_a_stage_from_another_config_is_that_stage_with_the_entry_merged_over_it(tmp_path):
    base = tiny_vae_config(tmp_path)
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "base.yaml").write_text(yaml.safe_dump(base))
    taker = {**base, "stages": [
        {"name": "vae", "from": "shared/base.yaml"},  # relative to the config that names it
        {"name": "vae_wide", "from": "shared/base.yaml#vae", "model": {"latent_channels": 2},
         "training": {"max_steps": 5}},
    ]}
    config = load_config(write(tmp_path, taker))
    original = parse_run_config(base).stage("vae")
    assert config.stage("vae") == original
    wide = config.stage("vae_wide")
    assert (wide.model.latent_channels, wide.training.max_steps) == (2, 5)
    assert wide.model.block_out_channels == original.model.block_out_channels  # kept from the base
    assert wide.training.batch_size == original.training.batch_size


@pytest.mark.parametrize("reference, message", [
    ("missing.yaml", r"run\.yaml: stages\[0\]\.from: .*missing\.yaml: config file not found"),
    ("base.yaml#unet", r"run\.yaml: stages\[0\]\.from: .*base\.yaml has no stage named 'unet'; its stages are \['vae'\]"),
    ("#vae", r"run\.yaml: stages\[0\]\.from: '#vae' is not valid; expected FILE or FILE#STAGE"),
    ("run.yaml", r"run\.yaml: stages\[0\]\.from: 'run\.yaml' takes stages from itself"),
])
def test_a_stage_from_a_missing_file_or_stage_names_it(tmp_path, reference, message):
    base = tiny_vae_config(tmp_path)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, {**base, "stages": [{"name": "vae", "from": reference}]}))


def test_saved_config_loads_back_equal(tmp_path):
    config = parse_run_config(tiny_vae_config(tmp_path))
    save_config(config, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == config


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads_and_builds(path, tmp_path):
    config = load_config(path, [f"output_dir={tmp_path}", "data.max_train_samples=64"])
    data = load_data(config.data)
    for stage_config in config.stages:
        # A stage with an `input:` needs that stage's trained outputs; here it builds on the data alone.
        stage = get_stage_kind(stage_config.kind)(stage_config, data, None)
        assert sum(p.numel() for p in stage.build_model().parameters()) > 0


def test_fingerprint_ignores_keys_at_their_defaults(tmp_path):
    """A schema key added later (with a default that keeps the old behaviour) must not make
    finished stages look changed; a changed value must."""
    from stagediff.pipelines.run import stage_fingerprint

    raw = tiny_vae_config(tmp_path)
    plain = stage_fingerprint(parse_run_config(raw), "vae")
    raw["stages"][0]["training"]["max_nonfinite_skips"] = 0  # written out at its default
    assert stage_fingerprint(parse_run_config(raw), "vae") == plain
    raw["stages"][0]["training"]["max_nonfinite_skips"] = 1
    assert stage_fingerprint(parse_run_config(raw), "vae") != plain


def test_fingerprint_ignores_previews_logging_and_checkpoints(tmp_path):
    """How often a stage previews, logs or checkpoints changes none of its outputs: a finished
    demo's VAE is reused after `sample_every` changes; how far it trains is part of its outputs."""
    from stagediff.pipelines.run import stage_fingerprint

    raw = tiny_vae_config(tmp_path)
    plain = stage_fingerprint(parse_run_config(raw), "vae")
    raw["stages"][0]["training"].update(sample_every=7, log_every=3, checkpointing_steps=5,
                                        checkpoints_total_limit=4, resume_from_checkpoint="latest")
    assert stage_fingerprint(parse_run_config(raw), "vae") == plain
    raw["stages"][0]["training"]["max_steps"] += 1
    assert stage_fingerprint(parse_run_config(raw), "vae") != plain


def test_a_folder_saved_before_a_schema_key_existed_is_the_same_run(tmp_path):
    from stagediff.pipelines.run import other_runs

    config = parse_run_config(tiny_vae_config(tmp_path / "run"))
    folder = tmp_path / "run" / "vae"
    folder.mkdir(parents=True)
    saved = yaml.safe_load(yaml.safe_dump(config_to_dict(config)))
    del saved["stages"][0]["training"]["max_nonfinite_skips"]  # as written by an older stagediff
    del saved["stages"][0]["model"]["kl_weight"]  # (a key at its default value)
    (folder / "config.yaml").write_text(yaml.safe_dump(saved))
    assert other_runs(config) == {}
    saved["seed"] = 3
    (folder / "config.yaml").write_text(yaml.safe_dump(saved))
    assert "seed is 3 there, 0 here" in other_runs(config)[folder]


def test_configs_that_share_an_output_dir_share_their_common_stages():
    """configs/mnist_ldm_sr.yaml and photos_sr.yaml reuse a finished VAE of mnist_ldm.yaml and
    photos_ldm.yaml (same output_dir): a stage of the same name must have the same fingerprint in
    both, or the second config retrains it (and overwrites the first's)."""
    from stagediff.pipelines.run import stage_fingerprint

    by_output_dir = {}
    for path in CONFIGS:
        config = load_config(path)
        by_output_dir.setdefault(config.output_dir, []).append(config)
    shared = [configs for configs in by_output_dir.values() if len(configs) > 1]
    assert len(shared) >= 2, "mnist_ldm + mnist_ldm_sr and photos_ldm + photos_sr share output dirs"
    for configs in shared:
        names = set.intersection(*({s.name for s in c.stages} for c in configs))
        assert names, [str(c.output_dir) for c in configs]
        for name in names:
            assert len({stage_fingerprint(c, name) for c in configs}) == 1, (configs[0].output_dir, name)
