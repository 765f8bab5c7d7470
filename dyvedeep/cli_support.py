"""Helpers shared by the commands that run a model on data (``verify``, ``eval``, ``bench``,
``calibrate``): the data arguments and the dataset they open, an onnxruntime session, a progress
line, and a description of the platform a run happens on."""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from .errors import DyveError
from .plan import Plan


def platform_info() -> dict[str, Any]:
    """Where this run happens; ``DYVEDEEP_EMULATED=1`` marks an emulated board."""
    return {
        "machine": platform.machine(),
        "system": platform.system(),
        "python": platform.python_version(),
        "emulated": os.environ.get("DYVEDEEP_EMULATED", "") == "1",
    }


def add_data_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """The options every command that reads a dataset takes."""
    parser.add_argument("--data", required=required, metavar="SPEC",
                        help="dataset and split, e.g. cifar10:test, imagenet-sample:calib, npz:FILE")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="use only the first N images")
    parser.add_argument("--mirror", type=Path, default=None, metavar="DIR",
                        help="offline mirror directory (default: $DYVEDEEP_MIRROR or ../shared/mirror)")


def open_dataset(plan: Plan, spec: str, limit: int | None, mirror: Path | None):
    """The dataset ``spec`` with the model's preprocessing; checks the label sets agree."""
    from .datasets import load_dataset

    if plan.preprocess is None and not spec.startswith("npz:"):
        raise DyveError(f"{plan.path}: no input preprocessing in the model's metadata; convert it with dyvedeep convert")
    dataset = load_dataset(spec, plan.preprocess, mirror=mirror, limit=limit)
    label_set = getattr(dataset, "label_set", None)
    if plan.labels and label_set and plan.labels != label_set:
        raise DyveError(f"{plan.path}: the model predicts {plan.labels} classes but {spec} has {label_set} labels")
    shape = tuple(dataset.images(0, 1).shape[1:]) if len(dataset) else tuple(plan.input_shape)
    if shape != tuple(plan.input_shape):
        raise DyveError(f"{plan.path}: input shape {plan.input_shape} does not match {spec} images {shape}")
    return dataset


class Progress:
    """A progress line on stderr, at most every few seconds, for long loops."""

    def __init__(self, label: str, total: int, every_seconds: float = 5.0) -> None:
        self.label, self.total, self.every = label, total, every_seconds
        self.start = self.last = time.monotonic()

    def update(self, done: int) -> None:
        now = time.monotonic()
        if now - self.last >= self.every or done == self.total:
            rate = done / max(now - self.start, 1e-9)
            print(f"{self.label}: {done}/{self.total} images ({rate:.1f}/s)", file=sys.stderr, flush=True)
            self.last = now


def onnxruntime_session(path: Path, threads: int):
    """An onnxruntime session with ``threads`` intra-op threads, run sequentially."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise DyveError("onnxruntime is not installed: pip install onnxruntime (the reference engine)") from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:
        raise DyveError(f"{path}: onnxruntime cannot load it: {str(err).splitlines()[0]}") from None
