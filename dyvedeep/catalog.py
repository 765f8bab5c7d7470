r"""URLs and checksums of the dataset files the loaders fetch (generated from the offline
mirror's ``MANIFEST.tsv``; every entry is the file's real public URL).

- CIFAR-10, lossless PNG copies (PeterJensen/cnn): train images 0..3999 in four PNG batches of
  1000, test images 0..999 in ``cifar10_batch_50.png``, and a JS array of 51000 labels.
- CIFAR-10, the official python tarball (not in the mirror: downloaded from its real URL).
- ImageNet sample (EliSchwartz/imagenet-sample-images): 1000 JPEGs, one per class, named
  ``<wnid>_<name>.JPEG``; :func:`imagenet_sample` lists them sorted by wnid, so the position of an
  entry is the class index of a Caffe ImageNet model.

Regenerate the ImageNet table (``imagenet_sample.csv`` beside this module) with::

    (echo sha256,file; awk -F'\t' '$1 ~ /imagenet-sample-images.*JPEG$/ {sub(/.*\//, "", $1); print $3 "," $1}' \
        MANIFEST.tsv | sort -t, -k2)
"""
from __future__ import annotations

import csv
import importlib.resources
import io
from functools import lru_cache

CIFAR10_PNG_BASE = "https://github.com/PeterJensen/cnn/raw/7246f8d20604aeff3d31080f28cb124a6171e6bd/demo/cifar10/"
# Lossless CIFAR-10 batches: (file name, checksum, first image index, source split).
CIFAR10_PNG_BATCHES: tuple[tuple[str, str, int, str], ...] = (
    ("cifar10_batch_0.png", "sha256:0614720d69293a033786d5fe2924c4e9a9b48874f19ca4627c4662a864ee9f2d", 0, "train"),
    ("cifar10_batch_1.png", "sha256:2927e26ea68602e34a7424826b76b7336ce36b8f6bcc2e9fce0c05568ff6b4c1", 1000, "train"),
    ("cifar10_batch_2.png", "sha256:0b2759e307bb405bb1a6531f8a0f557eaec46d7546050612fdb836f0fa60eae0", 2000, "train"),
    ("cifar10_batch_3.png", "sha256:a4530ff15c83886058a97c352f53f38be07d191de8f410e998e91786b5900a26", 3000, "train"),
    ("cifar10_batch_50.png", "sha256:5cea9e8fb7933540a2236a4bb25c1ed3a8447f345c55ae659143a95a5d8dac5e", 0, "test"),
)
# JS array of 51000 ints: the 50000 train labels, then the labels of test images 0..999.
CIFAR10_LABELS_URL = "https://github.com/PeterJensen/cnn/raw/8f2fb298ae528a1fe410e580e4ad9f5b6813bb2a/demo/cifar10/cifar10_labels.js"
CIFAR10_LABELS_CHECKSUM = "sha256:f482175c1417531377e189c7fa35093727845396ca86e225af7a3dc594b101f8"

# The official CIFAR-10 python tarball (md5 published by its authors).
CIFAR10_PYTHON_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_PYTHON_CHECKSUM = "md5:c58f30108f718f92721af3b95e74349a"

IMAGENET_SAMPLE_BASE = "https://github.com/EliSchwartz/imagenet-sample-images/raw/bc69043e2862758a1906c6a24a792bb28c6bb2ff/"
# imagenet_sample.csv: sha256 and file name per row, sorted by wnid (= class index order).
IMAGENET_SAMPLE_FILE = "imagenet_sample.csv"


@lru_cache(maxsize=None)
def imagenet_sample() -> tuple[tuple[str, str], ...]:
    """The 1000 sample JPEGs as (file name, "sha256:HEX"), sorted by wnid (= class index)."""
    text = importlib.resources.files(__package__).joinpath(IMAGENET_SAMPLE_FILE).read_text(encoding="utf-8")
    entries = [(row["file"], f"sha256:{row['sha256']}") for row in csv.DictReader(io.StringIO(text))]
    entries.sort(key=lambda e: e[0].split("_", 1)[0])
    return tuple(entries)


@lru_cache(maxsize=None)
def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet wnids, sorted: position = class index of a Caffe ImageNet model."""
    return tuple(name.split("_", 1)[0] for name, _ in imagenet_sample())


def imagenet_sample_url(name: str) -> str:
    """The real URL of one sample JPEG."""
    return IMAGENET_SAMPLE_BASE + name
