"""data.source "photos": real photographs read offline from the installed wheels, cut into seeded
crops, and split by photograph (chelsea and coffee held out), checked by the crops' pixels."""

import socket

import numpy as np
import pytest
import torch

from stagediff.pipelines import data as data_module
from stagediff.pipelines.data import (
    HELD_OUT_PHOTOS,
    PHOTO_CROP_SIDE,
    PHOTO_FILES,
    DataConfig,
    load_data,
    load_photos,
    preprocess,
    split_indices,
)

CROPS = 12  # per split: every training photo gets one or two crops, each held-out photo six


def photo_config(**overrides) -> DataConfig:
    return DataConfig(**{"source": "photos", "resolution": 64, "channels": 3, "photo_crops": CROPS, **overrides})


def stacked(split) -> torch.Tensor:
    return torch.stack([split[i]["x"] for i in range(len(split))])


def test_photos_load_offline(monkeypatch):
    """Decoded from the wheels with every socket refused: nothing is fetched (scikit-image's own
    loaders would download a file its wheel lacks)."""
    def refuse(*args, **kwargs):
        raise OSError("network access in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    data_module._photos.cache_clear()
    photos = data_module._photos()
    assert list(photos) == list(PHOTO_FILES) and all(photo.mode == "RGB" for photo in photos.values())


def test_photos_are_the_libraries_own_images():
    """The files are the images the libraries' public loaders return (the motorcycle: the left one)."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    photos = {name: np.asarray(photo) for name, photo in data_module._photos().items()}
    china, flower = load_sample_images().images
    expected = {"china": china, "flower": flower, "stereo_motorcycle": skimage.data.stereo_motorcycle()[0]}
    for name in PHOTO_FILES:
        reference = expected.get(name)
        if reference is None:
            reference = getattr(skimage.data, name)()
        assert np.array_equal(photos[name], reference), name


@pytest.mark.parametrize("resolution", [64, 128])
def test_photos_are_rgb_crops_in_model_range(resolution):
    splits = load_data(photo_config(resolution=resolution))
    for split in (splits.train, splits.validation):
        x = stacked(split)
        assert x.shape == (CROPS, 3, resolution, resolution) and x.dtype == torch.float32
        assert x.min() >= -1 and x.max() <= 1 and x.std() > 0.1
        assert all(split[i]["label"] == -1 for i in range(len(split)))
    assert splits.kind == "image" and splits.sample_shape == (3, resolution, resolution)
    assert splits.num_classes is None  # unlabelled: no classifier learns to tell the photos apart


def test_one_channel_is_the_grayscale_of_the_rgb_crops():
    rgb, gray = stacked(load_data(photo_config()).train), stacked(load_data(photo_config(channels=1)).train)
    assert gray.shape == (CROPS, 1, 64, 64)
    luma = (0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2])[:, None]  # PIL's "L" weights
    # Converting before or after the (linear, clamped) resize differs by rounding only.
    assert (gray - luma).abs().mean() < 2 / 127.5


def test_crops_are_deterministic_and_seeded():
    first, again, other = (load_data(photo_config(split_seed=seed)) for seed in (0, 0, 1))
    for split in ("train", "validation"):
        assert torch.equal(stacked(getattr(first, split)), stacked(getattr(again, split)))
        assert not torch.equal(stacked(getattr(first, split)), stacked(getattr(other, split)))
    assert torch.equal(first.train.dataset.boxes, again.train.dataset.boxes)


def test_split_is_by_photo_in_the_recorded_boxes():
    splits = load_data(photo_config())
    crops = splits.train.dataset
    names_in = {split: {crops.photo_names[i] for i in crops.photos[getattr(splits, split).indices].tolist()}
                for split in ("train", "validation")}
    assert names_in["validation"] == set(HELD_OUT_PHOTOS)
    assert names_in["train"] == set(PHOTO_FILES) - set(HELD_OUT_PHOTOS)
    # Squares inside their photo, at several scales.
    photos = data_module._photos()
    for index in range(len(crops)):
        left, top, right, bottom = crops.boxes[index].tolist()
        width, height = photos[crops.photo_names[crops.photos[index]]].size
        assert 0 <= left < right <= width and 0 <= top < bottom <= height and right - left == bottom - top
        low, high = PHOTO_CROP_SIDE
        assert low * min(width, height) - 1 <= right - left <= high * min(width, height)
    fractions = (crops.boxes[:, 2] - crops.boxes[:, 0]).float() / torch.tensor(
        [min(photos[crops.photo_names[i]].size) for i in crops.photos.tolist()])
    assert fractions.min() < 0.5 < fractions.max()


def test_validation_fraction_and_max_train_samples_leave_the_photo_split_alone():
    base = load_data(photo_config())
    for changed in (load_data(photo_config(validation_fraction=0.5)), load_data(photo_config(max_train_samples=5))):
        assert changed.validation.indices == base.validation.indices
        assert set(changed.train.indices) <= set(base.train.indices)
    assert len(load_data(photo_config(max_train_samples=5)).train) == 5


def source_photos(crops, index: int, cfg: DataConfig) -> set[str]:
    """The photos whose pixels, cut at item `index`'s box and preprocessed, give exactly its pixels:
    the item's origin read from its content, not from the photo it is recorded under."""
    box = tuple(crops.boxes[index].tolist())
    return {name for name, photo in data_module._photos().items()
            if box[2] <= photo.width and box[3] <= photo.height
            and torch.equal(preprocess(photo.crop(box), cfg), crops.samples[index])}


def test_split_is_by_photo_in_the_pixels():
    """No training crop is cut from a held-out photo and every validation crop is, judged by pixels;
    the same check run on a split by crop over the same crops fails it."""
    cfg = photo_config()
    splits = load_data(cfg)
    crops = splits.train.dataset
    sources = [source_photos(crops, index, cfg) for index in range(len(crops))]
    assert all(len(found) == 1 for found in sources)  # each crop matches its photo exactly, and only it

    def leaks(train, validation) -> bool:
        return any(sources[i] & set(HELD_OUT_PHOTOS) for i in train) or \
            any(not sources[i] <= set(HELD_OUT_PHOTOS) for i in validation)

    assert not leaks(splits.train.indices, splits.validation.indices)
    by_crop = split_indices(load_photos(cfg).labels, 0.5, seed=0)  # the split of the other sources
    assert leaks(*(indices.tolist() for indices in by_crop))


@pytest.mark.parametrize("bad", [0, -3, 1.5, True, "10", None])
def test_bad_photo_crops_are_named(bad):
    with pytest.raises(ValueError, match=r"data\.photo_crops=.* is invalid: expected a positive integer"):
        DataConfig(source="photos", photo_crops=bad)


def test_a_model_card_describes_the_photos_and_their_held_out_split():
    from stagediff.pipelines.config import config_to_dict
    from stagediff.pipelines.data import DataConfig, describe_data

    saved = config_to_dict(DataConfig(source="photos", photo_crops=200, channels=3, resolution=64))  # as in config.yaml
    text = describe_data(saved)
    assert "200 crops" in text and "chelsea and coffee held out" in text and "3x64x64" in text


@pytest.mark.numerics
def test_samples_of_photos_are_scored_by_patch_realism_without_labels():
    """No classifier can be trained on unlabelled photos: their samples get the SWD of their patches
    against the held-out photos, where a blurred copy of real crops scores worse than the crops."""
    from stagediff.modules.sr import downsample, resize
    from stagediff.pipelines.evaluation import generation_metrics

    splits = load_data(photo_config(resolution=32, photo_crops=64))
    real = stacked(splits.train)
    blurred = resize(downsample(real, 4), (32, 32)).clamp(-1, 1)  # bicubic x4 down and up
    sharp, blurry = generation_metrics(real, splits, "cpu"), generation_metrics(blurred, splits, "cpu")
    assert set(sharp) == {"swd", "swd_32", "swd_16"} and not {"fd", "classes_covered"} & set(sharp)
    assert blurry["swd_32"] > 1.5 * sharp["swd_32"], (sharp, blurry)


def test_a_config_saved_before_photo_crops_existed_still_describes_itself():
    from stagediff.pipelines.config import config_to_dict
    from stagediff.pipelines.data import DataConfig, describe_data

    saved = config_to_dict(DataConfig(source="mnist", resolution=32))
    del saved["photo_crops"]  # as in a config.yaml written before the key
    assert describe_data(saved).startswith("the 5,000 MNIST digits")
