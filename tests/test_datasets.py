"""Tests of dyvedeep.datasets: spec parsing, CIFAR-10 and the ImageNet sample from the real mirror
(labels, splits, pixels, preprocessing), user ImageNet directories, corrupt images, the CIFAR
python tarball (synthetic copy), the npz round trip and blended calibration images."""
from __future__ import annotations

import hashlib
import io
import json
import pickle
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import mirror_path
from dyvedeep import catalog
from dyvedeep.datasets import Dataset, blended, export_npz, load_dataset, parse_spec, spec_source
from dyvedeep.errors import DyveError
from dyvedeep.preprocess import Preprocess

RAW_RGB = Preprocess(channel_order="RGB")
IMAGENET = Preprocess(channel_order="BGR", resize=[256, 256], crop=[227, 227], mean_values=[104.0, 117.0, 123.0])
PNG_DIR = catalog.CIFAR10_PNG_BASE


def js_labels(mirror: Path) -> list[int]:
    """The CIFAR-10 labels JS file parsed independently of the loader."""
    text = mirror_path(mirror, catalog.CIFAR10_LABELS_URL).read_text()
    return json.loads(text[text.index("["): text.rindex("]") + 1])


def png_rows(mirror: Path, name: str) -> np.ndarray:
    return np.asarray(Image.open(mirror_path(mirror, PNG_DIR + name)).convert("RGB"))


# --- specs -----------------------------------------------------------------------------------

def test_parse_spec() -> None:
    assert parse_spec("cifar10") == ("cifar10", None, "test")
    assert parse_spec("imagenet-sample:calib") == ("imagenet-sample", None, "calib")
    assert parse_spec("imagenet-val=/data/val:calib") == ("imagenet-val", "/data/val", "calib")
    assert parse_spec("imagenet-val=/data/val") == ("imagenet-val", "/data/val", "all")
    assert parse_spec("npz:/tmp/a:b.npz") == ("npz", "/tmp/a:b.npz", "")


def test_spec_source_drops_only_the_split() -> None:
    """What the pipeline fetches once for both splits (workflow/rules/common.smk calls it)."""
    assert spec_source("cifar10:calib") == spec_source("cifar10") == "cifar10"
    assert spec_source("imagenet-val=/data/v:al:calib") == "imagenet-val=/data/v:al"
    assert spec_source("imagenet-val=/data/val") == "imagenet-val=/data/val"
    with pytest.raises(DyveError, match="valid specs"):
        spec_source("cifar10:train")


@pytest.mark.parametrize("spec", ["mnist:test", "cifar10:train", "imagenet-val", ""])
def test_unknown_spec_lists_valid_names(spec: str) -> None:
    with pytest.raises(DyveError) as info:
        load_dataset(spec, RAW_RGB)
    assert "cifar10:calib|test" in str(info.value) and "imagenet-val=DIR" in str(info.value)


# --- CIFAR-10 from the mirror ----------------------------------------------------------------

@pytest.mark.mirror
def test_cifar10_labels_and_split_sizes(mirror: Path, tmp_path: Path) -> None:
    labels = js_labels(mirror)
    assert len(labels) == 51000
    test = load_dataset("cifar10:test", RAW_RGB, mirror=mirror, cache_dir=tmp_path)
    calib = load_dataset("cifar10:calib", RAW_RGB, mirror=mirror, cache_dir=tmp_path)
    assert (len(test), len(calib)) == (1000, 4000)
    assert test.labels.dtype == np.int64
    assert test.labels.tolist() == labels[50000:51000]
    assert test.labels[:5].tolist() == [3, 8, 8, 0, 6]  # the well-known first CIFAR-10 test labels
    assert calib.labels.tolist() == labels[:4000]
    assert test.ids[17] == "cifar10:test:17" and calib.ids[2500] == "cifar10:train:2500"
    assert len(load_dataset("cifar10:calib", RAW_RGB, mirror=mirror, cache_dir=tmp_path, limit=1500)) == 1500


@pytest.mark.mirror
def test_cifar10_image_equals_its_png_row(mirror: Path, tmp_path: Path) -> None:
    test = load_dataset("cifar10:test", RAW_RGB, mirror=mirror, cache_dir=tmp_path)
    row = png_rows(mirror, "cifar10_batch_50.png")[17]
    expected = row.reshape(32, 32, 3).transpose(2, 0, 1).astype(np.float32)
    got = test.images(17, 18)
    assert got.shape == (1, 3, 32, 32) and got.dtype == np.float32
    np.testing.assert_array_equal(got[0], expected)
    calib = load_dataset("cifar10:calib", Preprocess(channel_order="BGR", mean_values=[1.0, 2.0, 3.0]),
                         mirror=mirror, cache_dir=tmp_path, limit=2600)
    row = png_rows(mirror, "cifar10_batch_2.png")[500].reshape(32, 32, 3).transpose(2, 0, 1)
    expected = row[::-1].astype(np.float32) - np.array([1, 2, 3], np.float32)[:, None, None]
    np.testing.assert_array_equal(calib.images(2500, 2501)[0], expected)


@pytest.mark.mirror
def test_cifar10_batches_cover_the_split(mirror: Path, tmp_path: Path) -> None:
    test = load_dataset("cifar10:test", RAW_RGB, mirror=mirror, cache_dir=tmp_path, limit=250)
    seen = [(x.shape, y.copy()) for x, y in test.batches(100)]
    assert [s for s, _ in seen] == [(100, 3, 32, 32), (100, 3, 32, 32), (50, 3, 32, 32)]
    np.testing.assert_array_equal(np.concatenate([y for _, y in seen]), test.labels)


# --- ImageNet sample -------------------------------------------------------------------------

@pytest.mark.mirror
def test_catalog_matches_the_mirror_manifest(mirror: Path) -> None:
    manifest = {}
    for line in (mirror / "MANIFEST.tsv").read_text().splitlines():
        url, _size, sha256, _blob = line.split("\t")
        manifest[url] = "sha256:" + sha256
    sample = catalog.imagenet_sample()
    assert len(sample) == 1000
    for name, checksum in sample:
        assert manifest[catalog.imagenet_sample_url(name)] == checksum
    jpegs = sorted(p.name.split("_")[0] for p in mirror_path(mirror, catalog.IMAGENET_SAMPLE_BASE + "x").parent.glob("*.JPEG"))
    assert list(catalog.imagenet_wnids()) == jpegs


def test_imagenet_sample_splits(tmp_path: Path) -> None:
    calib = load_dataset("imagenet-sample:calib", IMAGENET, cache_dir=tmp_path)
    test = load_dataset("imagenet-sample:test", IMAGENET, cache_dir=tmp_path)
    assert (len(calib), len(test)) == (500, 500)
    assert not set(calib.ids) & set(test.ids)
    assert sorted(np.concatenate([calib.labels, test.labels]).tolist()) == list(range(1000))
    assert calib.labels.tolist() == list(range(0, 1000, 2))
    wnids = catalog.imagenet_wnids()
    assert wnids == tuple(sorted(wnids))
    for ds in (calib, test):
        assert all(wnids[label] == name.split("_")[0] for label, name in zip(ds.labels, ds.ids))
    assert test.ids[0] == "n01443537_goldfish.JPEG" and test.labels[0] == 1


def caffe_like(path: Path) -> np.ndarray:
    """The ImageNet preprocessing written out by hand for one JPEG."""
    img = Image.open(path).convert("RGB").resize((256, 256), Image.BILINEAR)
    rgb = np.asarray(img, dtype=np.float32)[14:241, 14:241]
    bgr = rgb[:, :, ::-1].transpose(2, 0, 1)
    return bgr - np.array([104, 117, 123], np.float32)[:, None, None]


@pytest.mark.mirror
def test_imagenet_sample_preprocessing_and_cache(mirror: Path, tmp_path: Path) -> None:
    ds = load_dataset("imagenet-sample:test", IMAGENET, mirror=mirror, cache_dir=tmp_path, limit=6)
    assert ds.cache_file is not None and not ds.cached
    xs = [x for x, _ in ds.batches(4)]
    assert [x.shape for x in xs] == [(4, 3, 227, 227), (2, 3, 227, 227)]
    assert ds.cached and ds.cache_file.is_file()
    first = mirror_path(mirror, catalog.imagenet_sample_url(ds.ids[0]))
    np.testing.assert_allclose(xs[0][0], caffe_like(first), atol=1e-4)
    # determinism: decoded again without the cache, and read back from the cache
    fresh = load_dataset("imagenet-sample:test", IMAGENET, mirror=mirror, cache_dir=tmp_path,
                         limit=6, preprocessed_cache=False)
    again = load_dataset("imagenet-sample:test", IMAGENET, mirror=mirror, cache_dir=tmp_path, limit=6)
    assert again.cached and not fresh.cached
    np.testing.assert_array_equal(fresh.images(), np.concatenate(xs))
    np.testing.assert_array_equal(again.images(), np.concatenate(xs))
    # another preprocessing is another cache entry
    other = Preprocess(channel_order="RGB", resize=[224, 224], pixel_scale=1 / 255)
    ds2 = load_dataset("imagenet-sample:test", other, mirror=mirror, cache_dir=tmp_path, limit=6)
    assert ds2.cache_file != ds.cache_file and not ds2.cached
    assert ds2.images(0, 1).shape == (1, 3, 224, 224)


# --- user ImageNet directories and corrupt images --------------------------------------------

def write_jpeg(path: Path, seed: int, size: tuple[int, int] = (40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, "JPEG")


SMALL = Preprocess(channel_order="BGR", resize=[16, 16], crop=[12, 12], mean_values=[100.0, 110.0, 120.0])


def test_imagenet_val_folder_layout(tmp_path: Path) -> None:
    wnids = catalog.imagenet_wnids()
    root = tmp_path / "val"
    for k, (w, count) in enumerate([(wnids[5], 2), (wnids[0], 3), (wnids[999], 1)]):
        for j in range(count):
            write_jpeg(root / w / f"ILSVRC2012_val_{k}{j}.JPEG", seed=10 * k + j)
    everything = load_dataset(f"imagenet-val={root}", SMALL, cache_dir=tmp_path / "c")
    assert everything.labels.tolist() == [0, 0, 0, 5, 5, 999]
    assert everything.ids[0] == f"{wnids[0]}/ILSVRC2012_val_10.JPEG"
    calib = load_dataset(f"imagenet-val={root}:calib", SMALL, cache_dir=tmp_path / "c")
    test = load_dataset(f"imagenet-val={root}:test", SMALL, cache_dir=tmp_path / "c")
    assert calib.ids == everything.ids[0::2] and test.ids == everything.ids[1::2]
    x = everything.images()
    assert x.shape == (6, 3, 12, 12) and x.dtype == np.float32
    np.testing.assert_array_equal(calib.images(1, 2)[0], x[2])


def test_imagenet_val_flat_layout_with_caffe_val_txt(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    for j in range(3):
        write_jpeg(root / f"ILSVRC2012_val_0000000{j + 1}.JPEG", seed=j)
    wnid = catalog.imagenet_wnids()[42]
    (root / "val.txt").write_text(
        f"ILSVRC2012_val_00000001.JPEG 65\nILSVRC2012_val_00000002.JPEG {wnid}\nILSVRC2012_val_00000003.JPEG 0\n")
    ds = load_dataset(f"imagenet-val={root}", SMALL, cache_dir=tmp_path / "c")
    assert ds.labels.tolist() == [65, 42, 0]


def test_corrupt_jpeg_names_the_file(tmp_path: Path) -> None:
    wnid = catalog.imagenet_wnids()[3]
    root = tmp_path / "val"
    write_jpeg(root / wnid / "a_good.JPEG", seed=1)
    (root / wnid / "b_garbage.JPEG").write_bytes(b"\xff\xd8 not really a jpeg")
    good = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(good, "JPEG")
    (root / wnid / "c_truncated.JPEG").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    ds = load_dataset(f"imagenet-val={root}", SMALL, cache_dir=tmp_path / "c")
    assert ds.images(0, 1).shape == (1, 3, 12, 12)
    for i, name in ((1, "b_garbage.JPEG"), (2, "c_truncated.JPEG")):
        with pytest.raises(DyveError, match=re.escape(name)):
            ds.images(i, i + 1)
    with pytest.raises(DyveError, match="b_garbage.JPEG"):
        list(ds.batches(8))
    assert ds.cache_file is not None and not ds.cache_file.exists()


def test_missing_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DyveError, match="does not exist"):
        load_dataset(f"imagenet-val={tmp_path / 'nowhere'}", SMALL)


# --- CIFAR-10 python tarball (a small synthetic copy in a fake mirror) ------------------------

def test_cifar10_python_tarball(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    members = {}
    for name, count in (("data_batch_1", 4100), ("test_batch", 20)):
        data = (np.arange(count * 3072, dtype=np.int64) * 7 % 251).astype(np.uint8).reshape(count, 3072)
        labels = rng.integers(0, 10, count).tolist()
        members[name] = (data, labels)
    blob = io.BytesIO()
    with tarfile.open(fileobj=blob, mode="w:gz") as tar:
        for name, (data, labels) in members.items():
            payload = pickle.dumps({b"batch_label": b"x", b"data": data, b"labels": labels}, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    mirror = tmp_path / "mirror"
    target = mirror_path(mirror, catalog.CIFAR10_PYTHON_URL)
    target.parent.mkdir(parents=True)
    target.write_bytes(blob.getvalue())
    monkeypatch.setattr(catalog, "CIFAR10_PYTHON_CHECKSUM", "md5:" + hashlib.md5(blob.getvalue()).hexdigest())
    calib = load_dataset("cifar10-python:calib", RAW_RGB, mirror=mirror, cache_dir=tmp_path / "c")
    test = load_dataset("cifar10-python:test", RAW_RGB, mirror=mirror, cache_dir=tmp_path / "c", limit=7)
    assert (len(calib), len(test)) == (4000, 7)
    assert calib.labels.tolist() == members["data_batch_1"][1][:4000]
    # the python batches are channel-planar: R plane, G plane, B plane, each 32x32 row-major
    np.testing.assert_array_equal(test.images(5, 6)[0], members["test_batch"][0][5].reshape(3, 32, 32))
    assert test.ids[5] == "cifar10-python:test:5"


# --- npz -------------------------------------------------------------------------------------

def test_npz_round_trip(tmp_path: Path) -> None:
    wnids = catalog.imagenet_wnids()
    root = tmp_path / "val"
    for j in range(5):
        write_jpeg(root / wnids[j * 7] / f"img{j}.JPEG", seed=j)
    ds = load_dataset(f"imagenet-val={root}", SMALL, cache_dir=tmp_path / "c")
    out = export_npz(ds, tmp_path / "ship" / "test.npz", batch_size=2)
    assert out.is_file() and not [p for p in out.parent.iterdir() if p != out]
    back = load_dataset(f"npz:{out}", SMALL)
    np.testing.assert_array_equal(back.images(), ds.images())
    assert back.labels.dtype == np.int64 and back.labels.tolist() == ds.labels.tolist()
    assert back.ids == ds.ids and (back.name, back.split, back.label_set) == ("imagenet-val", "all", "imagenet")
    assert len(load_dataset(f"npz:{out}", None, limit=2)) == 2
    with pytest.raises(DyveError, match="preprocessed differently"):
        load_dataset(f"npz:{out}", RAW_RGB)
    (tmp_path / "bad.npz").write_bytes(b"not an npz")
    with pytest.raises(DyveError, match="bad.npz"):
        load_dataset(f"npz:{tmp_path / 'bad.npz'}", None)


def test_imagenet_sample_table_is_package_data_and_complete() -> None:
    """catalog reads imagenet_sample.csv through importlib.resources: pyproject ships it."""
    import fnmatch
    import tomllib

    root = Path(__file__).resolve().parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["dyvedeep"]
    assert any(fnmatch.fnmatch(catalog.IMAGENET_SAMPLE_FILE, p) for p in patterns)
    entries = catalog.imagenet_sample()
    assert len(entries) == 1000 and len(set(catalog.imagenet_wnids())) == 1000
    assert all(c.startswith("sha256:") and len(c) == 7 + 64 for _, c in entries)


# --- blended calibration images ----------------------------------------------------------------

def test_blended_images_mix_each_image_with_another() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((7, 3, 4, 4)).astype(np.float32)
    base = Dataset("toy", "calib", np.arange(7) % 3, [f"toy:{i}" for i in range(7)], label_set="cifar10",
                   preprocess=None, array=x)
    mixed = blended(base, 0.25, seed=1)
    out = mixed.images()
    assert out.shape == x.shape and out.dtype == np.float32
    assert mixed.labels.tolist() == base.labels.tolist()
    # each image is 3/4 of itself and 1/4 of exactly one other image, every image a partner once
    partners = []
    for i in range(7):
        rest = (out[i] - 0.75 * x[i]) / 0.25
        found = [j for j in range(7) if np.allclose(rest, x[j], atol=1e-5)]
        assert len(found) == 1 and found[0] != i
        partners.append(found[0])
    assert sorted(partners) == list(range(7))
    np.testing.assert_array_equal(blended(base, 0.25, seed=1).images(), out)  # deterministic
    assert not np.array_equal(blended(base, 0.25, seed=2).images(), out)
    assert blended(base, 0.0) is base
    with pytest.raises(DyveError, match="--mix"):
        blended(base, 0.5)
