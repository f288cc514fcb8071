"""Property-based tests (hypothesis) of the two parsers of user input: the config parser and the
image loader. Whatever they are fed, they either return a well-formed result or raise their own
error type, which names the key (config) or the file (image); nothing else escapes."""

import dataclasses
import io
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings, strategies as st
from PIL import Image

from stagediff.pipelines.config import ConfigError, RunConfig, StageConfig, TrainingConfig, config_to_dict, save_config
from stagediff.pipelines.registry import load_config
from stagediff.pipelines.data import BadImageError, DataConfig, read_image
from stagediff.pipelines.registry import STAGE_KINDS

from helpers import tiny_vae_config

from .helpers import toy_ddpm_config, with_latent_ddpm

# Derandomized: the same examples on every run, so the suite cannot flake.
PROPERTY_SETTINGS = settings(max_examples=300, derandomize=True, database=None, deadline=None,
                             suppress_health_check=[HealthCheck.too_slow])
BASES = [toy_ddpm_config("runs/toy"), with_latent_ddpm(tiny_vae_config("runs/ldm")),
         *(toy_ddpm_config("runs/toy") | {"stages": [{"name": kind, "kind": kind, "model": model}]} for kind, model in (
             ("flow", {"num_scales": 1, "hidden_channels": 8, "scale_bound": 2.0, "temperature": 1.0}),
             ("gan", {"latent_dim": 8, "hidden": 16, "r1_gamma": 0.0, "n_critic": 1})))]
VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 70), st.integers(min_value=10 ** 310, max_value=10 ** 320),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
    st.sampled_from(["1e-4", "latest", "..", "vae"]),
    st.lists(st.integers(-2, 64), max_size=4), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


def key_paths(node, prefix=()) -> list[tuple]:
    """Every key path of a raw config (list items by index), leaves and inner nodes alike."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    found = []
    for key, value in items:
        found.append((*prefix, key))
        found += key_paths(value, (*prefix, key))
    return found


@st.composite
def mutated_configs(draw) -> dict:
    """A shipped-like raw config with one key replaced, added or removed."""
    raw = yaml.safe_load(yaml.safe_dump(draw(st.sampled_from(BASES))))  # a deep copy
    path = draw(st.sampled_from(key_paths(raw)))
    parent = raw
    for key in path[:-1]:
        parent = parent[key]
    action = draw(st.sampled_from(["replace", "add", "remove"]))
    if action == "replace":
        parent[path[-1]] = draw(VALUES)
    elif action == "add" and isinstance(parent, dict):
        parent[draw(st.text(min_size=1, max_size=8))] = draw(VALUES)
    elif action == "remove":
        parent.pop(path[-1]) if isinstance(parent, dict) else parent.pop(path[-1])
    return raw


def locations(raw: dict) -> set[str]:
    """Every place an error may name in `raw`: its keys and the schema's, as dotted paths
    (`seed`, `data.resolution`, `stages.vae.model.latent_channels`, `stages[0].name`, ...)."""
    found = {"stages"} | {str(k) for k in raw} | {f.name for f in dataclasses.fields(RunConfig)}
    found |= {f"data.{k}" for k in (raw.get("data") if isinstance(raw.get("data"), dict) else {})}
    found |= {f"data.{f.name}" for f in dataclasses.fields(DataConfig)}
    for index, stage in enumerate(raw.get("stages") if isinstance(raw.get("stages"), list) else []):
        found |= {f"stages[{index}]", f"stages[{index}].name", f"stages[{index}].kind"}
        if not isinstance(stage, dict):
            continue
        where = f"stages.{stage.get('name')}"
        blocks = {"": [f.name for f in dataclasses.fields(StageConfig)] + list(stage),
                  "training.": [f.name for f in dataclasses.fields(TrainingConfig)],
                  "model.": [f.name for f in dataclasses.fields(STAGE_KINDS[stage["kind"]].model_config)]
                  if isinstance(stage.get("kind"), str) and stage["kind"] in STAGE_KINDS else []}
        for block, keys in blocks.items():
            given_keys = stage.get(block[:-1]) if block and isinstance(stage.get(block[:-1]), dict) else {}
            for key in [*keys, *given_keys]:
                found.add(f"{where}.{block}{key}")
                value = given_keys.get(key) if block else stage.get(key)
                found |= {f"{where}.{block}{key}[{i}]" for i in range(len(value))} if isinstance(value, list) else set()
    return found


@pytest.fixture(scope="module")
def folder():
    with tempfile.TemporaryDirectory() as name:
        yield Path(name)


@PROPERTY_SETTINGS
@given(raw=mutated_configs())
@example(raw=toy_ddpm_config("runs/toy", ema_decay=10 ** 400))  # found by this test: was an OverflowError
@example(raw=BASES[2] | {"stages": [BASES[2]["stages"][0] | {"model": {"scale_bound": 0}}]})  # and an unlocated error
def test_the_config_parser_returns_a_config_or_a_located_config_error(folder, raw):
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    try:
        config = load_config(path)
    except ConfigError as err:  # "FILE: LOCATION: why" or "FILE: LOCATION=value why"
        message = str(err)
        assert message.startswith(f"{path}: ")
        message = message[len(f"{path}: "):]
        assert any(message.startswith(place) and message[len(place):][:1] in (":", "=")
                   for place in locations(raw)), message
        return
    save_config(config, folder / "saved.yaml")  # what a run writes into its stage folders...
    again = load_config(folder / "saved.yaml")  # ...reads back as the same config (NaN included)
    assert yaml.safe_dump(config_to_dict(again)) == yaml.safe_dump(config_to_dict(config))


MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I", "I;16", "F"]
FORMATS = ["PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP"]


@st.composite
def image_files(draw) -> bytes:
    """The bytes of a small image of any mode PIL writes, in a format that can hold that mode."""
    mode, image_format = draw(st.sampled_from(MODES)), draw(st.sampled_from(FORMATS))
    width, height = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    noise = np.random.default_rng(draw(st.integers(0, 2 ** 16))).integers(0, 256, (height, width, 4), dtype=np.uint8)
    image = Image.fromarray(noise, "RGBA").convert("RGB" if mode in ("1", "I", "I;16", "F") else mode)
    if mode in ("1", "I", "I;16", "F"):
        image = image.convert("L").convert(mode)
    buffer = io.BytesIO()
    try:
        image.save(buffer, format=image_format)
    except (OSError, ValueError, KeyError):  # this format cannot hold this mode
        return draw(st.nothing())
    return buffer.getvalue()


def damaged(data: bytes, draw) -> bytes:
    how = draw(st.sampled_from(["truncate", "flip", "junk"]))
    if how == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))]
    if how == "flip":
        at = draw(st.integers(0, len(data) - 1))
        return data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1:]
    return draw(st.binary(max_size=200))


@PROPERTY_SETTINGS
@given(data=image_files(), channels=st.sampled_from([1, 3, 4]), resolution=st.integers(1, 24),
       center_crop=st.booleans())
def test_every_image_pil_writes_loads_at_the_configured_shape(data, channels, resolution, center_crop):
    cfg = DataConfig(channels=channels, resolution=resolution, center_crop=center_crop)
    pixels = read_image({"bytes": data, "path": "folder/picture"}, "row 0", cfg)
    assert pixels.dtype.is_floating_point is False and tuple(pixels.shape) == (channels, resolution, resolution)


@PROPERTY_SETTINGS
@given(data=image_files(), draw=st.data(), channels=st.sampled_from([1, 3, 4]))
def test_a_damaged_image_loads_or_fails_naming_the_file(data, draw, channels):
    cfg = DataConfig(channels=channels, resolution=8)
    try:
        pixels = read_image({"bytes": damaged(data, draw.draw), "path": "folder/damaged.img"}, "row 0", cfg)
    except BadImageError as err:
        assert str(err).startswith("folder/damaged.img: cannot read image (")
    else:
        assert tuple(pixels.shape) == (channels, 8, 8)
