"""The labelled images of the mirror the real-data tests read: the lossless CIFAR-10 test
images and the ImageNet sample."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image

from dyvedeep.fetch import mirror_path

CIFAR10_TEST_PNG = ("https://github.com/PeterJensen/cnn/raw/7246f8d20604aeff3d31080f28cb124a6171e6bd/"
                    "demo/cifar10/cifar10_batch_50.png")
CIFAR10_LABELS_JS = ("https://github.com/PeterJensen/cnn/raw/8f2fb298ae528a1fe410e580e4ad9f5b6813bb2a/"
                     "demo/cifar10/cifar10_labels.js")
IMAGENET_SAMPLE_DIR = ("https://github.com/EliSchwartz/imagenet-sample-images/raw/"
                       "bc69043e2862758a1906c6a24a792bb28c6bb2ff")


def cifar10_test_images(mirror: Path) -> tuple[np.ndarray, np.ndarray]:
    """The 1000 lossless CIFAR-10 test images (1000, 32, 32, 3) uint8 RGB and their labels."""
    rows = np.asarray(Image.open(mirror_path(mirror, CIFAR10_TEST_PNG)).convert("RGB"))
    labels = [int(v) for v in re.findall(r"\d+", mirror_path(mirror, CIFAR10_LABELS_JS).read_text())]
    return rows.reshape(1000, 32, 32, 3), np.asarray(labels[50000:51000])


def imagenet_sample(mirror: Path, every: int = 1) -> tuple[list[Path], np.ndarray]:
    """Every ``every``-th ImageNet sample JPEG (sorted by wnid) and its Caffe class index."""
    files = sorted(mirror_path(mirror, IMAGENET_SAMPLE_DIR).glob("n*.JPEG"))
    wnids = sorted(f.name.split("_")[0] for f in files)
    chosen = files[::every]
    return chosen, np.asarray([wnids.index(f.name.split("_")[0]) for f in chosen])


def load_resized_rgb(path: Path, size: tuple[int, int]) -> np.ndarray:
    """An image file as RGB uint8 (H, W, 3) warped to ``size`` (bilinear, as Caffe's resize)."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB").resize((size[1], size[0]), Image.BILINEAR))
