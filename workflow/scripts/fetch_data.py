"""Fetch a data set (mirror first, then its URLs; checksums verified) into the download cache,
or check a user's ImageNet validation directory. Writes {status: ok|missing, reason, data}.
Never fails: a data set that cannot be had makes the benchmarks that need it "missing"."""
import sys

sys.path.insert(0, snakemake.scriptdir)  # noqa: F821 (snakemake is injected)
from _common import say, start_log  # noqa: E402
from dyvedeep.io_utils import write_json_atomic  # noqa: E402

start_log(snakemake)  # noqa: F821
source = snakemake.params.source  # noqa: F821
label = source.rstrip("=")
mirror = snakemake.params.mirror or None  # noqa: F821
out = snakemake.output[0]  # noqa: F821


def fetch_all(source):
    from pathlib import Path

    from dyvedeep import catalog
    from dyvedeep.fetch import fetch

    if source == "cifar10":
        fetch(catalog.CIFAR10_LABELS_URL, catalog.CIFAR10_LABELS_CHECKSUM, mirror=mirror, progress=False)
        for name, checksum, _, _ in catalog.CIFAR10_PNG_BATCHES:
            fetch(catalog.CIFAR10_PNG_BASE + name, checksum, mirror=mirror, progress=False)
        return "6 files"
    if source == "cifar10-python":
        fetch(catalog.CIFAR10_PYTHON_URL, catalog.CIFAR10_PYTHON_CHECKSUM, mirror=mirror)
        return "1 file"
    if source == "imagenet-sample":
        entries = catalog.imagenet_sample()
        for name, checksum in entries:
            fetch(catalog.imagenet_sample_url(name), checksum, mirror=mirror, progress=False)
        return f"{len(entries)} files"
    if source.startswith("imagenet-val="):
        from dyvedeep.datasets import scan_imagenet_val

        directory = source.split("=", 1)[1]
        if not directory:
            raise LookupError("no ImageNet validation directory configured (set imagenet_val_dir)")
        root = Path(directory).expanduser()
        if not root.is_dir():
            raise LookupError(f"ImageNet validation directory {root} does not exist")
        return f"{len(scan_imagenet_val(root))} images in {root}"
    raise LookupError(f"unknown data source {source!r}")


from dyvedeep.errors import DyveError  # noqa: E402

try:
    what = fetch_all(source)
    status = {"status": "ok", "reason": "", "data": source, "files": what}
    print(f"data {label}: ok ({what})")
except (DyveError, LookupError, OSError) as err:
    reason = " ".join(str(err).split())
    status = {"status": "missing", "reason": f"data {label}: {reason}", "data": source}
    say(f"dyvedeep: data {label} missing: {reason}")
write_json_atomic(out, status)
