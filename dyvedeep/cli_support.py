"""Helpers shared by the commands that run a model on data (``verify``, ``eval``, ``bench``,
``calibrate``): the model they load (checked first: the one place an ONNX file's metadata, weights
and attributes are validated), the data arguments and the dataset they open, an onnxruntime
session, a progress line, and a description of the platform a run happens on."""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import json
import math

import numpy as np

from .errors import DyveError
from .metadata_keys import LABEL_SETS, LABELS_KEY, NONZERO_KEY, PREPROCESS_KEY, SOURCE_KEY
from .plan import Plan, build_plan
from .preprocess import Preprocess

# The range of the integer attributes the engine reads (an ONNX file may hold anything): sizes
# and counts >= 1, pads >= 0, axes of a tensor of rank <= 8.
ATTRIBUTE_RANGES = {"strides": (1, 1 << 16), "kernel_shape": (1, 1 << 16), "dilations": (1, 1 << 16),
                    "group": (1, 1 << 16), "pads": (0, 1 << 16), "axis": (-8, 8)}


def check_onnx_model(path: Path) -> None:
    """Validate an ONNX file the engine is to run: readable, metadata of the documented form,
    weights finite and of their declared shape, counting attributes in range. Every problem is
    one DyveError naming the file, the field and the problem."""
    import onnx
    from onnx import numpy_helper

    try:
        model = onnx.load(str(path))
    except OSError as err:
        raise DyveError(f"{path}: cannot read the model ({err.strerror or err})") from None
    except Exception as err:  # protobuf's DecodeError and friends: a damaged file
        raise DyveError(f"{path}: not a readable ONNX model ({type(err).__name__})") from None
    for prop in model.metadata_props:
        problem = _metadata_problem(prop.key, prop.value)
        if problem:
            raise DyveError(f"{path}: metadata {prop.key}: {problem}")
    for init in model.graph.initializer:
        try:
            array = numpy_helper.to_array(init)
        except Exception as err:  # size and dims disagree, unknown type
            raise DyveError(f"{path}: weights {init.name}: {str(err)[:80] or type(err).__name__}") from None
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise DyveError(f"{path}: weights {init.name} hold NaN or Inf")
    for node in model.graph.node:
        for attr in node.attribute:
            values = list(attr.ints) or ([attr.i] if attr.type == onnx.AttributeProto.INT else [])
            low, high = ATTRIBUTE_RANGES.get(attr.name, (None, None))
            if low is not None and any(not low <= v <= high for v in values):
                raise DyveError(f"{path}: node {node.name or node.op_type}: {attr.name} {values[:8]} "
                                f"out of range [{low}, {high}]")
            floats = list(attr.floats) or ([attr.f] if attr.type == onnx.AttributeProto.FLOAT else [])
            if any(not math.isfinite(f) for f in floats):
                raise DyveError(f"{path}: node {node.name or node.op_type}: {attr.name} is NaN or Inf")


def _metadata_problem(key: str, value: str) -> str | None:
    """What is wrong with one of the harness's metadata values (None when it is fine)."""
    if key == PREPROCESS_KEY:
        try:
            Preprocess.from_json(value)
        except (ValueError, TypeError) as err:
            return str(err)
    elif key == LABELS_KEY and value not in LABEL_SETS:
        return f"unknown label set {value[:40]!r} (known: {', '.join(LABEL_SETS)})"
    elif key in (NONZERO_KEY, SOURCE_KEY):
        try:
            data = json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            return "not valid JSON"
        if not isinstance(data, dict):
            return "expected a JSON object"
        if key == NONZERO_KEY and not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                          for v in data.values()):
            return "counts must be integers >= 0"
    return None


def load_plan(path: Path) -> Plan:
    """The engine plan of the ONNX file ``path``, after :func:`check_onnx_model`; whatever the
    planner trips over in a file that passed is still one line naming the file."""
    check_onnx_model(path)
    try:
        return build_plan(path)
    except DyveError:
        raise
    except (ValueError, KeyError, IndexError, TypeError, ZeroDivisionError, OverflowError) as err:
        raise DyveError(f"{path}: the engine cannot plan this model ({type(err).__name__}: "
                        f"{str(err)[:80]})") from None


def platform_info() -> dict[str, Any]:
    """Where this run happens; ``DYVEDEEP_EMULATED=1`` marks an emulated board."""
    return {
        "machine": platform.machine(),
        "system": platform.system(),
        "python": platform.python_version(),
        "emulated": os.environ.get("DYVEDEEP_EMULATED", "") == "1",
    }


def add_data_arguments(parser: argparse.ArgumentParser, required: bool = True, calibration: bool = False) -> None:
    """The options every command that reads a dataset takes; ``calibration``: also ``--mix``,
    for the commands that choose a setting on calibration images."""
    parser.add_argument("--data", required=required, metavar="SPEC",
                        help="dataset and split, e.g. cifar10:test, imagenet-sample:calib, npz:FILE")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="use only the first N images")
    parser.add_argument("--mirror", type=Path, default=None, metavar="DIR",
                        help="offline mirror directory (default: $DYVEDEEP_MIRROR or ../shared/mirror)")
    if calibration:
        parser.add_argument("--mix", type=float, default=0.0, metavar="W",
                            help="blend each calibration image with another one, W the other's weight "
                                 "(default 0: off; beyond the specification, for nets that know their "
                                 "calibration images by heart: docs/knobs.md)")


def open_dataset(plan: Plan, spec: str, limit: int | None, mirror: Path | None, mix: float = 0.0):
    """The dataset ``spec`` with the model's preprocessing; checks the label sets agree, that
    there are images (every command computes a statistic over them) and that every label is one
    of the model's outputs. ``mix`` > 0: each image blended with another (:func:`blended`)."""
    from .datasets import blended, load_dataset

    if plan.preprocess is None and not spec.startswith("npz:"):
        raise DyveError(f"{plan.path}: no input preprocessing in the model's metadata; convert it with dyvedeep convert")
    dataset = blended(load_dataset(spec, plan.preprocess, mirror=mirror, limit=limit), mix)
    if len(dataset) == 0:
        raise DyveError(f"{spec}: no images to run on" + (f" (--limit {limit})" if limit is not None else ""))
    label_set = getattr(dataset, "label_set", None)
    if plan.labels and label_set and plan.labels != label_set:
        raise DyveError(f"{plan.path}: the model predicts {plan.labels} classes but {spec} has {label_set} labels")
    shape = tuple(dataset.images(0, 1).shape[1:])
    if shape != tuple(plan.input_shape):
        raise DyveError(f"{plan.path}: input shape {plan.input_shape} does not match {spec} images {shape}")
    classes = int(np.prod(plan.output_shape))
    labels = np.asarray(dataset.labels)
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        raise DyveError(f"{spec}: label {int(labels.max() if labels.max() >= classes else labels.min())} "
                        f"is not one of the model's {classes} outputs")
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


def onnxruntime_outputs(session: Any, input_name: str, x: np.ndarray, path: Path) -> np.ndarray:
    """onnxruntime's first output on ``x``; its failure is one line naming the model. A model
    whose batch dimension is fixed at 1 (as many exported models are) runs image by image."""
    batch = next((i.shape[0] for i in session.get_inputs() if i.name == input_name), None)
    try:
        if batch == 1 and len(x) != 1:
            return np.concatenate([session.run(None, {input_name: x[n:n + 1]})[0] for n in range(len(x))])
        return session.run(None, {input_name: x})[0]
    except Exception as err:  # onnxruntime raises its own Fail/InvalidArgument/RuntimeException
        raise DyveError(f"{path}: onnxruntime cannot run it: {str(err).splitlines()[0][:200]}") from None
