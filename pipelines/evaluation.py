"""The numbers every generative family is judged by, on images and on 2-D toys.

Images: the Fréchet distance (FID's formula, Heusel et al. 2017) in the feature space of a small
classifier trained on the same data, the offline substitute for FID on digits, plus the class
coverage and reverse KL of the classifier's verdicts (the Stacked-MNIST protocol of VEEGAN and
PacGAN). `train_test_floor` gives the FD a perfect model would reach. The classifier is trained
once per data config and cached (`get_feature_classifier`).

Super-resolution: PSNR and SSIM against the ground truth, and the consistency PSNR between the
downsampled output and the input (`super_resolution_metrics`).

Toys: the VEEGAN/PacGAN mode coverage on the Gaussian mixtures and the mean negative log-density
of samples under the true density (`toy_metrics`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from stagediff.modules.classifier import ImageClassifier
from stagediff.modules.metrics import (class_histogram_metrics, frechet_distance, mode_coverage, psnr,
                                      sliced_wasserstein_distance, ssim)
from stagediff.modules.sr import downsample
from stagediff.modules.toy2d import IsotropicGaussianMixture, make_toy

from .data import DataConfig, DataSplits, load_data
from .latents import decode_prior, load_vae

CLASSIFIER_INFO = "classifier_info.json"  # written last, so its presence marks a complete folder
CACHE_FOLDER_PREFIX = "feature-classifier-"
EVAL_BATCH_SIZE = 256


@dataclass(frozen=True)
class ClassifierRecipe:
    """How the feature classifier is built and trained; part of its cache key.

    The defaults reach ~98% validation accuracy on the embedded MNIST at 32x32 in 4 epochs.
    """

    block_channels: tuple[int, ...] = (16, 32, 64)
    feature_dim: int = 64
    epochs: int = 4
    batch_size: int = 64
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0


# ----------------------------------------------------------------------------- feature classifier


def get_feature_classifier(data_cfg: DataConfig, cache_dir: str | Path, device: torch.device | str,
                           recipe: ClassifierRecipe = ClassifierRecipe()) -> tuple[ImageClassifier, dict]:
    """The classifier for `data_cfg`, trained on its train split the first time, then loaded from cache.

    The cache folder, `cache_dir/feature-classifier-<hash of data_cfg and recipe>`, holds the model
    (`save_pretrained`: config.json + safetensors) and `classifier_info.json`. It is written into a
    temporary folder and renamed into place, so it is either complete or absent; when two processes
    race, the first rename wins and the other loads the winner (in a distributed run, let the main
    process call first, e.g. under `accelerator.main_process_first()`, so that only it trains). A
    process killed mid-write leaves only a hidden `.tmp-*` folder, never a half-written cache entry.
    The returned model is always the one read back from disk, so a fresh and a cached call compute
    identical features.

    Returns:
        (classifier in eval mode on `device`, info): info holds validation_accuracy, train_seconds,
        num_train, num_validation, cache_key, path, and trained_now (False when loaded from cache).
    """
    key = classifier_cache_key(data_cfg, recipe)
    folder = Path(cache_dir) / f"{CACHE_FOLDER_PREFIX}{key}"
    trained_now = not (folder / CLASSIFIER_INFO).is_file()
    if trained_now:
        classifier, info = train_classifier(load_data(data_cfg), recipe, device)
        _publish(classifier, {**info, "cache_key": key}, folder)
    info = json.loads((folder / CLASSIFIER_INFO).read_text())
    classifier = ImageClassifier.from_pretrained(folder).to(device).eval()
    return classifier, {**info, "path": str(folder), "trained_now": trained_now}


def classifier_cache_key(data_cfg: DataConfig, recipe: ClassifierRecipe) -> str:
    """16 hex digits of SHA-256 over the whole data config and recipe: any field that could change
    the training data or the split (hence the validation accuracy) gives a new classifier."""
    content = {"data": dataclasses.asdict(data_cfg), "recipe": dataclasses.asdict(recipe)}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def _publish(classifier: ImageClassifier, info: dict, folder: Path) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{folder.name}-", dir=folder.parent))  # same filesystem: atomic rename
    classifier.save_pretrained(tmp, safe_serialization=True)
    (tmp / CLASSIFIER_INFO).write_text(json.dumps(info, indent=2))
    try:
        os.rename(tmp, folder)
    except OSError:
        shutil.rmtree(tmp)
        if not (folder / CLASSIFIER_INFO).is_file():  # not a lost race: a real failure
            raise


@torch.enable_grad()  # callers may be evaluation code running under no_grad (Stage.evaluate)
def train_classifier(splits: DataSplits, recipe: ClassifierRecipe,
                     device: torch.device | str) -> tuple[ImageClassifier, dict]:
    """Cross-entropy training on the train split (AdamW, cosine decay); accuracy on the validation split."""
    if splits.kind != "image" or splits.num_classes is None:
        raise ValueError(f"the feature classifier needs labelled images; got {splits.description}")
    # Seeded initialisation that leaves the caller's global RNG where it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        classifier = ImageClassifier(in_channels=splits.sample_shape[0], num_classes=splits.num_classes,
                                     block_channels=recipe.block_channels, feature_dim=recipe.feature_dim)
    classifier.to(device).train()
    loader = DataLoader(splits.train, batch_size=recipe.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(recipe.seed))
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=recipe.learning_rate, weight_decay=recipe.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=recipe.epochs * len(loader))
    start = time.perf_counter()
    for _ in range(recipe.epochs):
        for batch in loader:
            loss = F.cross_entropy(classifier(batch["x"].to(device)), batch["label"].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    train_seconds = time.perf_counter() - start
    classifier.eval()
    _, logits, labels = dataset_outputs(classifier, splits.validation)
    return classifier, {
        "validation_accuracy": (logits.argmax(dim=1) == labels).double().mean().item(),
        "train_seconds": train_seconds,
        "num_train": len(splits.train),
        "num_validation": len(splits.validation),
    }


# ----------------------------------------------------------------------------- classifier outputs


@torch.no_grad()
def _batch_outputs(classifier: ImageClassifier, images: Tensor) -> tuple[Tensor, Tensor]:
    """Features (B, F) and logits (B, K), float32 on the CPU, of one batch of images."""
    features = classifier.features(images.to(classifier.device, classifier.dtype))
    return features.float().cpu(), classifier.head(features).float().cpu()


def image_outputs(classifier: ImageClassifier, images: Tensor) -> tuple[Tensor, Tensor]:
    """(N, C, H, W) images -> features (N, F) and logits (N, K)."""
    features, logits = zip(*(_batch_outputs(classifier, batch) for batch in images.split(EVAL_BATCH_SIZE)))
    return torch.cat(features), torch.cat(logits)


def dataset_outputs(classifier: ImageClassifier, dataset: Dataset) -> tuple[Tensor, Tensor, Tensor]:
    """A dataset of {"x", "label"} items -> features (N, F), logits (N, K) and labels (N,), streamed
    in batches so that only features, never all images, are held in memory."""
    features, logits, labels = [], [], []
    for batch in DataLoader(dataset, batch_size=EVAL_BATCH_SIZE):
        batch_features, batch_logits = _batch_outputs(classifier, batch["x"])
        features.append(batch_features)
        logits.append(batch_logits)
        labels.append(batch["label"])
    return torch.cat(features), torch.cat(logits), torch.cat(labels)


# ----------------------------------------------------------------------------- metrics


def image_metrics(samples: Tensor, reference: Tensor, classifier: ImageClassifier,
                  reference_labels: Tensor) -> dict[str, float | int]:
    """Fréchet distance and class metrics of generated images against reference images.

    Args:
        samples: (N, C, H, W) generated images in [-1, 1]; clamped to it first, as saving them as
            8-bit images would.
        reference: (N', C, H, W) real images (e.g. the train split).
        classifier: the feature classifier of the data (`get_feature_classifier`).
        reference_labels: (N',) true classes of `reference`, which give the reference histogram.

    Returns:
        fd: Fréchet distance between the classifier features of samples and reference (biased
            upwards by ~1/N: compare models at equal N, and against `train_test_floor`);
        classes_covered, class_kl: `class_histogram_metrics` of the classifier's predictions on
            the samples against the reference's class frequencies;
        num_samples, num_reference.
    """
    if samples.dim() != 4 or samples.shape[1:] != reference.shape[1:]:
        raise ValueError(f"samples {tuple(samples.shape)} and reference {tuple(reference.shape)} "
                         f"must both be (N, C, H, W) with the same C, H, W")
    sample_features, sample_logits = image_outputs(classifier, samples.clamp(-1, 1))
    reference_features, _ = image_outputs(classifier, reference)
    num_classes = classifier.config.num_classes
    reference_histogram = torch.bincount(reference_labels.long().cpu(), minlength=num_classes)
    return {
        "fd": frechet_distance(sample_features, reference_features),
        **class_histogram_metrics(sample_logits.argmax(dim=1), num_classes, reference_histogram),
        "num_samples": len(samples),
        "num_reference": len(reference),
    }


def conditional_metrics(samples: Tensor, requested: Tensor, data: DataSplits,
                        device: torch.device | str) -> dict[str, float]:
    """How well a class-conditional model's samples (N, C, H, W) match their `requested` (N,)
    classes, by the data's feature classifier:

    conditional_accuracy: the fraction of samples the classifier puts in the requested class;
    fd_per_class: the Fréchet distance between each class's samples and the train split's images
        of that class, averaged over the requested classes (the train split: the held-out one has
        too few images of each class for a covariance of the classifier's features). A model that
        draws the right classes with too little variety within each scores high here, however low
        its overall FD.
    """
    classifier, _ = get_feature_classifier(data.config, cache_dir(), device)
    features, logits = image_outputs(classifier, samples.clamp(-1, 1))
    reference_features, _, reference_labels = dataset_outputs(classifier, data.train)
    requested = requested.cpu()
    per_class = [frechet_distance(features[requested == c], reference_features[reference_labels == c])
                 for c in requested.unique().tolist()]
    return {"conditional_accuracy": (logits.argmax(dim=1) == requested).float().mean().item(),
            "fd_per_class": sum(per_class) / len(per_class)}


def train_test_floor(splits: DataSplits, classifier: ImageClassifier) -> float:
    """FD between the train and validation splits' classifier features: the value a perfect model
    would reach with as many samples as the validation split holds.

    FD is biased upwards by finite samples, so this floor is not 0; report a model's
    FD(len(validation) samples, train split) next to it.
    """
    train_features, _, _ = dataset_outputs(classifier, splits.train)
    validation_features, _, _ = dataset_outputs(classifier, splits.validation)
    return frechet_distance(validation_features, train_features)


def toy_metrics(samples: Tensor, toy: str) -> dict[str, float | int]:
    """Metrics of (N, 2) samples from a model of the toy distribution named `toy` (modules/toy2d).

    Returns:
        mean_neg_log_density: -mean ln p(x) in nats under the true density p, a Monte-Carlo
            cross-entropy. True samples give p's entropy; lower is not always better, since a model
            collapsed onto p's peaks scores below it, so read it with the coverage numbers.
            Infinite when any sample lies where p = 0 (off the checkerboard's black cells).
        outside_support_fraction: fraction of samples where p = 0 (only the checkerboard has such places).
        modes_covered, high_quality_fraction: `mode_coverage` (VEEGAN/PacGAN), for the Gaussian
            mixtures (ring8, grid25) only.
    """
    distribution = make_toy(toy)
    log_density = distribution.log_prob(samples.detach().double())  # float64: std 0.01 leaves little room
    metrics = {
        "mean_neg_log_density": -log_density.mean().item(),
        "outside_support_fraction": (log_density == -torch.inf).double().mean().item(),
    }
    if isinstance(distribution, IsotropicGaussianMixture):
        metrics.update(mode_coverage(samples, distribution.modes, distribution.std))
    return metrics


def super_resolution_metrics(outputs: Tensor, high_res: Tensor, low_res: Tensor, scale: int,
                             blur_sigma: float = 0.0) -> dict[str, float]:
    """Fidelity of super-resolved `outputs` (B, C, H, W) in [-1, 1], all averaged over images:

    psnr, ssim: against the ground truth `high_res` (dB; SSIM in [-1, 1]) on the [0, 1] range.
    consistency_psnr: between the output degraded as the input was (`downsample` with the same
        scale and blur) and the input `low_res`: a faithful model scores high whatever detail it
        invents, a model that ignores its input scores low.
    swd...: `patch_realism` of the outputs against the ground truth: a blurry output scores high
        however close its PSNR.
    """
    outputs = outputs.float().cpu()
    return {
        "psnr": psnr(outputs, high_res).mean().item(),
        "ssim": ssim(outputs, high_res).mean().item(),
        "consistency_psnr": psnr(downsample(outputs, scale, blur_sigma), low_res).mean().item(),
        **patch_realism(outputs, high_res),
    }


# patch_realism compares at most this many images of each set: its cost grows as N log N (sorting
# N * 128 projections per direction: 1,000 RGB 64x64 images take ~13 s on a 2-core AVX2 EPYC, 2,000 ~25 s).
PATCH_REALISM_MAX_IMAGES = 1000


def patch_realism(images: Tensor, reference: Tensor) -> dict[str, float]:
    """The sliced Wasserstein distance between the Laplacian-pyramid patches of two image sets
    (`sliced_wasserstein_distance`, x1e3; lower is more realistic), on the first equal numbers of
    images (its bias depends on the count; at most PATCH_REALISM_MAX_IMAGES) and with a fixed draw
    of patches and directions, so that two models compare on the same footing; {} for images under
    16 pixels a side (no pyramid level)."""
    count = min(len(images), len(reference), PATCH_REALISM_MAX_IMAGES)
    if min(images.shape[-2:]) < 16 or count < 2:
        return {}
    return sliced_wasserstein_distance(images[:count].float().cpu().clamp(-1, 1), reference[:count].float().cpu(),
                                       generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------- what a stage reports


def cache_dir() -> Path:
    """Where evaluation models (the feature classifier) are cached across runs."""
    return Path(os.environ.get("STAGEDIFF_CACHE", Path.home() / ".cache" / "stagediff"))


@torch.no_grad()
def generation_metrics(samples: Tensor, data: DataSplits, device: torch.device | str,
                       vae_dir: Path | None = None) -> dict[str, float | int]:
    """Metrics of generated samples against `data` (pixel or vector space, never latents).

    Toy data: `toy_metrics`. Images: `patch_realism` against the held-out split; labelled images
    also `image_metrics` against it, the train/held-out floor and, when `vae_dir` is given, the FD
    of that VAE decoding z ~ N(0, I) (the seed's point for latent diffusion: a learned latent prior
    beats the VAE's own prior). The feature classifier needs labels: unlabelled images (photos)
    get the patch metric alone.
    """
    if data.kind == "vector":
        return toy_metrics(samples, data.config.toy)
    reference = torch.stack([item["x"] for item in data.validation])
    realism = patch_realism(samples, reference)
    if data.num_classes is None:
        return realism
    classifier, _ = get_feature_classifier(data.config, cache_dir(), device)
    labels = torch.stack([item["label"] for item in data.validation])
    metrics = {**image_metrics(samples, reference, classifier, labels),
               "fd_train_vs_heldout": train_test_floor(data, classifier), **realism}
    if vae_dir is not None:
        # A fixed seed: the prior's FD is a property of the VAE, the same for every model trained on it.
        generator = torch.Generator(device).manual_seed(0)
        prior = decode_prior(load_vae(vae_dir, device), len(samples), generator, device)
        metrics["fd_vae_prior"] = image_metrics(prior, reference, classifier, labels)["fd"]
    return metrics
