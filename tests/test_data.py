"""Offline tests of stagediff.pipelines.data: every source through load_data, the shared
datasets.Dataset conversion, config validation and batch augmentation."""

import io
import re
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from torch.utils.data import DataLoader

from stagediff.modules.toy2d import TOY_DISTRIBUTIONS
from stagediff.pipelines.data import (
    BadImageError,
    BadImageTally,
    DataConfig,
    augment,
    hf_image_samples,
    image_file_rows,
    load_data,
    scan_image_folder,
    split_indices,
)

# Solid colours survive any resize unchanged, so each item's pixels identify its source file.
WHITE, RED, GREEN, BLUE = (255, 255, 255), (255, 0, 0), (0, 255, 0), (0, 0, 255)
# PIL's luma: L = (299 R + 587 G + 114 B) / 1000, rounded.
LUMA = {WHITE: 255, RED: 76, GREEN: 150, BLUE: 29}


def pixel_values(x: torch.Tensor) -> torch.Tensor:
    """Back from [-1, 1] to 8-bit values (k / 127.5 - 1 inverted)."""
    return torch.round((x + 1) * 127.5).long()


def all_items(splits):
    return [splits.train[i] for i in range(len(splits.train))] + [
        splits.validation[i] for i in range(len(splits.validation))
    ]


def save_image(path: Path, mode: str, size: tuple[int, int], color: tuple[int, int, int]) -> Path:
    """A solid-colour image file in one of the modes a folder may mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "P":
        image = Image.new("P", size, 0)
        image.putpalette(list(color) + [0, 0, 0] * 255)
        image.info["transparency"] = 1  # an unused palette index: exercises the P -> RGBA path
    elif mode == "RGBA":
        image = Image.new("RGBA", size, color + (128,))
    else:
        image = Image.new("RGB", size, color).convert(mode)
    image.save(path)
    return path


def noise_png_bytes(size: int = 64) -> bytes:
    """A valid PNG whose pixel data is large enough that cutting it in half truncates it."""
    noise = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def mixed_folder(tmp_path) -> Path:
    """Two classes of tiny PNGs in grayscale, RGB, RGBA and palette modes, all sizes differing."""
    folder = tmp_path / "images"
    save_image(folder / "bright" / "gray.png", "L", (20, 30), WHITE)
    save_image(folder / "bright" / "rgb.png", "RGB", (40, 40), RED)
    save_image(folder / "dark" / "rgba.png", "RGBA", (17, 9), GREEN)
    save_image(folder / "dark" / "palette.png", "P", (33, 21), BLUE)
    return folder


@pytest.fixture
def folder_with_bad_files(mixed_folder) -> tuple[Path, set[str]]:
    bad = mixed_folder / "dark"
    (bad / "corrupt.png").write_bytes(np.random.default_rng(1).bytes(300))
    complete = noise_png_bytes()
    (bad / "truncated.png").write_bytes(complete[: len(complete) // 2])
    (bad / "empty.png").write_bytes(b"")
    return mixed_folder, {str(bad / name) for name in ("corrupt.png", "truncated.png", "empty.png")}


# ----------------------------------------------------------------------------- mnist


@pytest.fixture(scope="module")
def mnist():
    return load_data(DataConfig())


def test_mnist_shapes_range_classes_and_split(mnist):
    assert (len(mnist.train), len(mnist.validation)) == (4500, 500)
    assert mnist.sample_shape == (1, 32, 32) and mnist.kind == "image" and mnist.num_classes == 10
    assert mnist.description == "mnist: 4500 train / 500 validation, 1x32x32, 10 classes"
    item = mnist.train[0]
    assert item["x"].shape == (1, 32, 32) and item["x"].dtype == torch.float32
    assert item["label"].dtype == torch.int64 and item["label"].shape == ()
    batch = torch.stack([mnist.train[i]["x"] for i in range(200)])
    assert batch.min() == -1 and batch.max() == 1
    # Zero padding 28 -> 32 leaves a 2-pixel black border.
    assert (batch[..., :2, :] == -1).all() and (batch[..., :, -2:] == -1).all()
    validation_labels = torch.stack([item["label"] for item in (mnist.validation[i] for i in range(500))])
    assert torch.bincount(validation_labels).tolist() == [50] * 10  # stratified


def test_mnist_is_deterministic(mnist):
    again = load_data(DataConfig())
    assert again.train.indices == mnist.train.indices
    assert again.validation.indices == mnist.validation.indices
    for index in (0, 1234, 4499):
        assert torch.equal(again.train[index]["x"], mnist.train[index]["x"])
        assert torch.equal(mnist.train[index]["x"], mnist.train[index]["x"])


def test_mnist_resizes_replicates_channels_and_truncates():
    splits = load_data(DataConfig(resolution=16, channels=3, max_train_samples=64))
    assert splits.sample_shape == (3, 16, 16) and len(splits.train) == 64 and len(splits.validation) == 500
    x = splits.train[0]["x"]
    assert x.shape == (3, 16, 16) and torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    # The truncated train split is a random subset, not the first (class-sorted) rows.
    assert len({int(splits.train[i]["label"]) for i in range(64)}) > 5


def test_max_eval_samples_keeps_a_class_balanced_part_of_the_validation_split():
    whole = load_data(DataConfig(resolution=8))
    kept = load_data(DataConfig(resolution=8, max_eval_samples=50))
    assert len(kept.validation) == 50 and kept.train.indices == whole.train.indices
    assert set(kept.validation.indices) < set(whole.validation.indices)
    labels = [int(kept.validation[i]["label"]) for i in range(50)]
    assert max(labels.count(c) for c in range(10)) <= 10  # not one class's rows: every class has ~5
    with pytest.raises(ValueError, match=r"data\.max_eval_samples=100 .*stream_validation_samples"):
        DataConfig(source="files", data_files=["a.parquet"], streaming=True, max_eval_samples=100)


# ----------------------------------------------------------------------------- splitting


def test_split_is_disjoint_complete_stratified_and_seeded():
    labels = torch.tensor([0] * 80 + [1] * 20)
    train, validation = split_indices(labels, 0.1, seed=3)
    assert sorted(train.tolist() + validation.tolist()) == list(range(100))
    assert torch.bincount(labels[validation]).tolist() == [8, 2]
    assert torch.equal(split_indices(labels, 0.1, seed=3)[1], validation)
    assert not torch.equal(split_indices(labels, 0.1, seed=4)[1], validation)


# ----------------------------------------------------------------------------- imagefolder


@pytest.mark.parametrize(
    "channels, expected_pixels",
    [
        (1, {(LUMA[c],) for c in LUMA}),
        (3, {WHITE, RED, GREEN, BLUE}),
        (4, {WHITE + (255,), RED + (255,), GREEN + (128,), BLUE + (255,)}),
    ],
)
def test_imagefolder_converts_every_mode_to_channels_and_resolution(mixed_folder, channels, expected_pixels, recwarn):
    cfg = DataConfig(source="imagefolder", train_data_dir=str(mixed_folder), resolution=8, channels=channels)
    splits = load_data(cfg)
    assert splits.num_classes == 2 and splits.sample_shape == (channels, 8, 8)
    assert (len(splits.train), len(splits.validation)) == (3, 1)
    items = all_items(splits)
    pixels = set()
    for item in items:
        assert item["x"].shape == (channels, 8, 8) and item["x"].dtype == torch.float32
        values = pixel_values(item["x"]).flatten(1)
        assert (values == values[:, :1]).all()  # solid colour preserved
        pixels.add(tuple(values[:, 0].tolist()))
    assert pixels == expected_pixels
    labels = sorted(int(item["label"]) for item in items)
    assert labels == [0, 0, 1, 1]
    assert not [w for w in recwarn if "Palette" in str(w.message)]


def test_imagefolder_center_crop_or_plain_resize(tmp_path):
    # Black | white | black: the centre crop (columns 20-30) sees only white, a plain resize
    # all three; the white band is wider than the crop so bicubic taps stay inside it.
    stripes = np.zeros((10, 50), dtype=np.uint8)
    stripes[:, 15:35] = 255
    for name in ("a.png", "b.png"):
        Image.fromarray(stripes).save(tmp_path / name)
    cropped = load_data(DataConfig(source="imagefolder", train_data_dir=str(tmp_path), resolution=8))
    squeezed = load_data(
        DataConfig(source="imagefolder", train_data_dir=str(tmp_path), resolution=8, center_crop=False)
    )
    assert cropped.num_classes is None and cropped.train[0]["label"] == -1  # no subfolders: unlabelled
    assert (cropped.train[0]["x"] == 1).all()
    x = squeezed.train[0]["x"][0]
    assert x[:, 0].max() < -0.9 and x[:, 4].min() > 0.9 and x[:, -1].max() < -0.9


def test_bad_images_raise_naming_the_file(folder_with_bad_files):
    folder, bad_paths = folder_with_bad_files
    splits = load_data(DataConfig(source="imagefolder", train_data_dir=str(folder)))
    named = set()
    for split in (splits.train, splits.validation):
        for index in range(len(split)):
            try:
                split[index]
            except BadImageError as err:
                assert str(err).startswith(f"{err.name}: cannot read image (")
                named.add(err.name)
    assert named == bad_paths


def test_skip_bad_images_replaces_them_lazily_and_counts_them_through_workers(folder_with_bad_files, recwarn):
    folder, bad_paths = folder_with_bad_files
    cfg = DataConfig(source="imagefolder", train_data_dir=str(folder), skip_bad_images=True, max_bad_fraction=0.5,
                     validation_fraction=0.3)
    splits = load_data(cfg)  # reads no image: nothing to warn about yet
    assert not recwarn.list and (len(splits.train), len(splits.validation)) == (5, 2)
    items = all_items(splits)
    assert all(item["x"].shape == (1, 32, 32) for item in items)
    # Each unreadable file is named by the item that stands in for it, a readable item of the same split.
    assert {item["bad"] for item in items} - {""} == bad_paths
    for split in (splits.train, splits.validation):
        pixels = [(tuple(pixel_values(split[i]["x"]).flatten().tolist()), split[i]["bad"]) for i in range(len(split))]
        assert {image for image, bad in pixels} == {image for image, bad in pixels if not bad}

    # The names ride in the batches, so they come back from a DataLoader worker process.
    tally = BadImageTally.of(cfg, len(splits.train))
    for batch in DataLoader(splits.train, batch_size=2, num_workers=1):
        tally.add(batch)
    tally.merge(lambda names: names, lambda count: count)
    bad_in_train = {item["bad"] for item in (splits.train[i] for i in range(5))} - {""}
    assert tally.names == bad_in_train and tally.read == 5 + len(bad_in_train)
    tally.check(final=True)  # at most half: no error
    with pytest.warns(UserWarning, match=rf"skipped {len(bad_in_train)} unreadable image\(s\) of 5 training images"):
        tally.warn()
    tally.max_fraction = 0.1
    with pytest.raises(ValueError, match=rf"at least {len(bad_in_train)} of its 5 training images are unreadable "
                                         rf"\({len(bad_in_train) / 5:.1%}\), more than data\.max_bad_fraction=0\.1: "):
        tally.check()


def test_an_image_folder_reads_as_datasets_imagefolder_builder_does(mixed_folder, folder_with_bad_files, tmp_path):
    images, plain = scan_image_folder(mixed_folder)
    ours = image_file_rows(images)
    theirs = datasets.load_dataset("imagefolder", data_dir=str(mixed_folder), split="train").cast_column(
        "image", datasets.Image(decode=False))
    assert ours.features["label"] == theirs.features["label"] and plain and len(ours) == 7
    assert ours["label"] == theirs["label"] and ours["image"] == theirs["image"]
    # Split names make datasets' builder keep the train split: such a folder goes through it.
    for split, count in (("train", 4), ("test", 3)):
        for index in range(count):
            save_image(tmp_path / "splits" / split / f"{index}.png", "L", (4, 4), WHITE)
    assert not scan_image_folder(tmp_path / "splits")[1]
    splits = load_data(DataConfig(source="imagefolder", train_data_dir=str(tmp_path / "splits"), resolution=4))
    assert len(splits.train) + len(splits.validation) == 4
    # Nothing is decoded before training: a folder of nothing but unreadable images loads.
    unreadable = tmp_path / "unreadable"
    unreadable.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        (unreadable / name).write_bytes(b"not an image")
    splits = load_data(DataConfig(source="imagefolder", train_data_dir=str(unreadable), skip_bad_images=True))
    with pytest.raises(ValueError, match=r"none of the 2 images of this split can be read"):
        splits.train[0]


def test_missing_empty_or_imageless_folder_errors_name_it(tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_data(DataConfig(source="imagefolder", train_data_dir=str(missing)))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=re.escape(f"{empty} is empty")):
        load_data(DataConfig(source="imagefolder", train_data_dir=str(empty)))
    (empty / "notes.txt").write_text("no pictures here")
    with pytest.raises(ValueError, match=re.escape(f"{empty} holds 1 file(s) but no images")):
        load_data(DataConfig(source="imagefolder", train_data_dir=str(empty)))


# ----------------------------------------------------------------------------- datasets.Dataset (hub)


def in_memory_dataset(label_feature) -> datasets.Dataset:
    colors = [WHITE, RED, GREEN, BLUE, WHITE, RED]
    features = datasets.Features({"image": datasets.Image(), "label": label_feature})
    return datasets.Dataset.from_dict(
        {"image": [Image.new("RGB", (12, 10), c) for c in colors], "label": [0, 1, 2, 0, 1, 2]},
        features=features,
    )


@pytest.mark.parametrize("label_feature", [datasets.ClassLabel(names=["a", "b", "c"]), datasets.Value("int32")])
def test_hf_dataset_conversion_reads_images_and_labels(label_feature):
    samples = hf_image_samples(in_memory_dataset(label_feature), DataConfig(channels=3, resolution=4), "memory")
    assert samples.num_classes == 3 and samples.labels.tolist() == [0, 1, 2, 0, 1, 2]
    item = samples.dataset[1]
    assert item["x"].shape == (3, 4, 4) and item["label"] == 1
    assert tuple(pixel_values(item["x"])[:, 0, 0].tolist()) == RED


def test_hf_dataset_without_label_column_is_unlabelled():
    rows = in_memory_dataset(datasets.ClassLabel(names=["a", "b", "c"])).remove_columns("label")
    samples = hf_image_samples(rows, DataConfig(), "memory")
    assert samples.num_classes is None and samples.labels.tolist() == [-1] * 6


def test_hf_dataset_missing_image_column_lists_available_ones():
    rows = in_memory_dataset(datasets.ClassLabel(names=["a", "b", "c"]))
    with pytest.raises(ValueError, match=re.escape("data.image_column='picture'")) as error:
        hf_image_samples(rows, DataConfig(image_column="picture"), "memory")
    assert "available columns: ['image', 'label']" in str(error.value)


def test_hf_dataset_unreadable_bytes_name_the_row():
    rows = datasets.Dataset.from_dict(
        {"image": [{"bytes": b"not an image", "path": None}] * 2}, features=datasets.Features({"image": datasets.Image()})
    )
    samples = hf_image_samples(rows, DataConfig(), "memory")
    with pytest.raises(BadImageError, match=r"^row 1: cannot read image"):
        samples.dataset[1]


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"resolution": 0}, "resolution"),
        ({"resolution": "32"}, "resolution"),
        ({"channels": 2}, "channels"),
        ({"validation_fraction": 1.0}, "validation_fraction"),
        ({"validation_fraction": 0}, "validation_fraction"),
        ({"source": "mnst"}, "source"),
        ({"max_train_samples": 0}, "max_train_samples"),
        ({"max_eval_samples": -1}, "max_eval_samples"),
        ({"toy_samples": -5}, "toy_samples"),
        ({"center_crop": "yes"}, "center_crop"),
        ({"source": "imagefolder"}, "train_data_dir"),
        ({"source": "hub"}, "dataset_name"),
        ({"source": "files"}, "data_files"),
        ({"source": "files", "data_files": []}, "data_files"),
        ({"source": "files", "data_files": ["a.parquet"], "data_format": "csv"}, "data_format"),
        ({"max_bad_fraction": 1.0}, "max_bad_fraction"),
        ({"max_bad_fraction": -0.1}, "max_bad_fraction"),
        ({"shuffle_buffer": 0}, "shuffle_buffer"),
        ({"stream_validation_samples": 0}, "stream_validation_samples"),
        ({"streaming": "yes"}, "streaming"),
    ],
)
def test_bad_config_values_name_the_key_and_value(overrides, key):
    with pytest.raises(ValueError, match=re.escape(f"data.{key}=")) as error:
        DataConfig(**overrides)
    value = overrides.get(key)
    assert repr(value) in str(error.value) and "expected" in str(error.value)


# ----------------------------------------------------------------------------- augment


def test_augment_flips_about_half_reproducibly():
    batch = torch.arange(1000 * 2 * 3, dtype=torch.float32).reshape(1000, 1, 2, 3)
    cfg = DataConfig(random_flip=True)
    torch.manual_seed(0)
    out = augment(batch, cfg)
    flipped = (out == batch.flip(-1)).flatten(1).all(1)
    kept = (out == batch).flatten(1).all(1)
    assert (flipped ^ kept).all()  # every image is either untouched or mirrored
    assert 400 < int(flipped.sum()) < 600
    torch.manual_seed(0)
    assert torch.equal(augment(batch, cfg), out)


def test_augment_is_identity_when_disabled_or_for_vectors():
    images = torch.randn(8, 3, 4, 4)
    assert augment(images, DataConfig(random_flip=False)) is images
    vectors = torch.randn(8, 2)
    assert augment(vectors, DataConfig(random_flip=True)) is vectors


# ----------------------------------------------------------------------------- toy


def test_toy_source_gives_seeded_vectors():
    cfg = DataConfig(source="toy", toy="ring8", toy_samples=1000)
    splits = load_data(cfg)
    assert splits.kind == "vector" and splits.sample_shape == (2,) and splits.num_classes is None
    assert (len(splits.train), len(splits.validation)) == (900, 100)
    assert splits.description == "toy ring8: 900 train / 100 validation, 2-d vectors, unlabelled"
    item = splits.train[0]
    assert item["x"].shape == (2,) and item["x"].dtype == torch.float32 and item["label"] == -1
    assert torch.equal(load_data(cfg).train[0]["x"], item["x"])
    assert not torch.equal(load_data(DataConfig(source="toy", toy_samples=1000, split_seed=1)).train[0]["x"], item["x"])


def test_unknown_toy_name_names_the_key():
    expected = f"data.toy='ring9' is invalid: expected one of {list(TOY_DISTRIBUTIONS)}"
    with pytest.raises(ValueError, match=re.escape(expected)):
        DataConfig(source="toy", toy="ring9")
