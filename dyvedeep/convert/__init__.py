"""The ``convert`` stage: Caffe-family models to the ONNX models of docs/architecture.md.

One module per source format (:mod:`.caffe` prototxt + caffemodel, :mod:`.deep_compression`
prototxt + .net, :mod:`.openvino` IR .xml + .bin); the format is detected from the file names.
This module adds the metadata (preprocessing, labels, source), checks the model with
onnx.checker and writes it atomically, and provides the ``dyvedeep convert`` sub-command.
"""
from __future__ import annotations

import argparse
from fractions import Fraction
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import DyveError
from ..metadata_keys import LABEL_SET_CLASSES, LABEL_SETS, LABELS_KEY, PREPROCESS_KEY
from ..preprocess import Preprocess
from .caffe import convert_caffe, read_mean_binaryproto
from .deep_compression import convert_deep_compression
from .onnx_graph import ConvertedModel, check_and_save, set_metadata
from .openvino import convert_openvino

__all__ = [
    "convert", "register", "detect_format", "preset_preprocess", "read_mean_binaryproto",
    "LABEL_SETS", "PRESETS",
]

CLASSES_OF_LABEL_SET = {classes: name for name, classes in LABEL_SET_CLASSES.items()}

# Format name -> function(source, weights) -> ConvertedModel.
CONVERTERS: dict[str, Callable[[Path, Path], ConvertedModel]] = {
    "caffe": convert_caffe,
    "deep_compression": convert_deep_compression,
    "openvino": convert_openvino,
}

# Preset name -> (preprocessing, label set). cifar10-caffe also needs the mean image (--mean);
# cifar10-caffe-data adds to a test net's own Data layer (scale, mean values) what its
# transform_param leaves open: the channel order (RGB, from accuracy) and the 32 x 32 size.
PRESETS: dict[str, tuple[Preprocess, str]] = {
    "cifar10-caffe": (Preprocess(channel_order="RGB"), "cifar10"),
    "cifar10-caffe-data": (Preprocess(channel_order="RGB", crop=[32, 32]), "cifar10"),
    "imagenet-caffe": (
        Preprocess(channel_order="BGR", resize=[256, 256], crop=[227, 227], mean_values=[104.0, 117.0, 123.0]),
        "imagenet",
    ),
    "imagenet-caffe-224": (
        Preprocess(channel_order="BGR", resize=[256, 256], crop=[224, 224], mean_values=[104.0, 117.0, 123.0]),
        "imagenet",
    ),
}
PRESETS_NEEDING_MEAN = ("cifar10-caffe",)


def detect_format(source: Path, weights: Path | None) -> tuple[str, Path, Path]:
    """(format, topology file, weights file) from the file names; errors name the file."""
    source = Path(source)
    weights = Path(weights) if weights is not None else None
    if weights is not None and weights.suffix == ".prototxt" and source.suffix != ".prototxt":
        source, weights = weights, source  # given in the other order
    if source.suffix == ".xml":
        weights = weights or source.with_suffix(".bin")
        fmt = "openvino"
    elif source.suffix == ".prototxt":
        if weights is None:
            raise DyveError(f"{source}: a prototxt needs its weights (.caffemodel or Deep Compression .net)")
        if weights.suffix == ".caffemodel":
            fmt = "caffe"
        elif weights.suffix == ".net":
            fmt = "deep_compression"
        else:
            raise DyveError(f"{weights}: cannot tell the weights format (expected .caffemodel or .net)")
    else:
        raise DyveError(f"{source}: cannot tell the model format (expected .prototxt or OpenVINO .xml)")
    for path in (source, weights):
        if not path.is_file():
            raise DyveError(f"{path}: file not found")
    return fmt, source, weights


def preset_preprocess(name: str, mean_file: Path | None = None) -> tuple[Preprocess, str]:
    """The preprocessing and label set of preset ``name`` (a fresh copy)."""
    if name not in PRESETS:
        raise DyveError(f"unknown preprocessing preset {name!r} (choose from {', '.join(PRESETS)})")
    base, labels = PRESETS[name]
    preprocess = Preprocess.from_json(base.to_json())
    if mean_file is not None:
        set_mean_image(preprocess, mean_file)
    elif name in PRESETS_NEEDING_MEAN:
        raise DyveError(f"preset {name} needs the mean image: add --mean FILE.binaryproto")
    return preprocess, labels


def set_mean_image(preprocess: Preprocess, mean_file: Path) -> None:
    """Subtract the mean image of a Caffe mean.binaryproto (replacing any mean values)."""
    mean = read_mean_binaryproto(Path(mean_file))
    preprocess.mean_image = [float(v) for v in mean.reshape(-1)]
    preprocess.mean_shape = [int(d) for d in mean.shape]
    preprocess.mean_values = None


def check_preprocess(preprocess: Preprocess, model: onnx.ModelProto, source: Path) -> None:
    """Fail when the preprocessing cannot produce the model's input (size or channels)."""
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    if len(dims) != 3:
        return
    channels, height, width = dims
    produced = preprocess.input_hw()
    if produced is not None and produced != (height, width):
        raise DyveError(f"{source}: the model takes {height} x {width} inputs but the preprocessing "
                        f"gives {produced[0]} x {produced[1]}")
    if preprocess.mean_shape is not None and list(preprocess.mean_shape) != [channels, height, width]:
        raise DyveError(f"{source}: the mean image is {' x '.join(map(str, preprocess.mean_shape))}, "
                        f"the model input {channels} x {height} x {width}")
    for key in ("mean_values", "std"):
        values = getattr(preprocess, key)
        if values is not None and len(values) != channels:
            raise DyveError(f"{source}: {len(values)} {key} for a {channels}-channel input")


def check_finite(model: onnx.ModelProto, weights: Path) -> None:
    """Refuse weights holding NaN or Inf, whatever the source format (they would make every
    output NaN, which a comparison with onnxruntime cannot catch)."""
    for init in model.graph.initializer:
        array = numpy_helper.to_array(init)
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            bad = int(np.flatnonzero(~np.isfinite(array.reshape(-1)))[0])
            raise DyveError(f"{weights}: weights {init.name} hold NaN or Inf (first at element {bad})")


def with_net_preprocess(given: Preprocess | None, from_net: str | None) -> Preprocess:
    """The preprocessing to store: the net's own (a Caffe Data layer's transform_param) with every
    field ``given`` sets away from its default put over it; ``given`` or the default without one."""
    if from_net is None:
        return given or Preprocess()
    merged = Preprocess.from_json(from_net)
    if given is None:
        return merged
    default = Preprocess()
    changed = {f: getattr(given, f) for f in Preprocess.__dataclass_fields__
               if getattr(given, f) != getattr(default, f)}
    if "mean_values" in changed:
        merged.mean_image = merged.mean_shape = None
    if "mean_image" in changed:
        merged.mean_values = None
    for key, value in changed.items():
        setattr(merged, key, value)
    return merged


def infer_labels(model: onnx.ModelProto) -> str | None:
    """The label set implied by the number of output classes (10 or 1000), if any."""
    dims = [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim[1:]]
    classes = dims[0] if dims and all(d == 1 for d in dims[1:]) else None
    return CLASSES_OF_LABEL_SET.get(classes or 0)


def convert(
    source: Path,
    weights: Path | None,
    out: Path,
    preprocess: Preprocess | None = None,
    labels: str | None = None,
) -> None:
    """Convert a model to ONNX at ``out`` (written atomically; nothing is left on failure).

    ``preprocess`` defaults to the net's own (a Caffe Data layer's transform_param), else to
    :class:`Preprocess`'s defaults; given with such a net, the fields it sets override the net's.
    ``labels`` defaults to the label set implied by the number of classes (10: cifar10, 1000:
    imagenet).
    """
    fmt, source, weights = detect_format(source, weights)
    if labels is not None and labels not in LABEL_SETS:
        raise DyveError(f"unknown label set {labels!r} (choose from {', '.join(LABEL_SETS)})")
    if fmt == "caffe":  # a Data layer may leave the input size to the preprocessing
        converted = convert_caffe(source, weights, preprocess.input_hw() if preprocess else None)
    else:
        converted = CONVERTERS[fmt](source, weights)
    model = converted.model
    check_finite(model, weights)
    preprocess = with_net_preprocess(preprocess, converted.metadata.get(PREPROCESS_KEY))
    check_preprocess(preprocess, model, source)
    metadata = {**converted.metadata, PREPROCESS_KEY: preprocess.to_json()}
    labels = labels or infer_labels(model)
    if labels is not None:
        metadata[LABELS_KEY] = labels
    set_metadata(model, metadata)
    check_and_save(model, Path(out), source)


# --------------------------------------------------------------------------- command line


def parse_pair(text: str) -> list[int]:
    """``H,W`` (or one number for both) as [H, W]."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected H,W, got {text!r}") from None
    if len(values) == 1:
        values *= 2
    if len(values) != 2 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected two positive integers H,W, got {text!r}")
    return values


def parse_floats(text: str) -> list[float]:
    """Comma-separated numbers."""
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def parse_number(text: str) -> float:
    """A number, also written as a fraction such as 1/255."""
    try:
        return float(Fraction(text))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a number such as 0.5 or 1/255, got {text!r}") from None


def preprocess_from_args(args: argparse.Namespace) -> tuple[Preprocess | None, str | None]:
    """The preprocessing and label set selected by the preset and override options."""
    labels = None
    if args.preset:
        preprocess, labels = preset_preprocess(args.preset, args.mean)
    else:
        preprocess = Preprocess()
        if args.mean is not None:
            set_mean_image(preprocess, args.mean)
    overrides = {
        "channel_order": args.channel_order, "resize": args.resize, "crop": args.crop,
        "pixel_scale": args.pixel_scale, "std": args.std, "scale": args.scale,
    }
    for key, value in overrides.items():
        if value is not None:
            setattr(preprocess, key, value)
    if args.mean_values is not None:
        preprocess.mean_values = args.mean_values
        preprocess.mean_image = preprocess.mean_shape = None
    chosen = args.preset or args.mean or any(v is not None for v in overrides.values()) or args.mean_values
    return (preprocess if chosen else None), (args.labels or labels)


def run_convert(args: argparse.Namespace) -> int:
    """``dyvedeep convert``: a thin wrapper over :func:`convert`."""
    preprocess, labels = preprocess_from_args(args)
    convert(args.source, args.weights, args.output, preprocess=preprocess, labels=labels)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``convert`` sub-command."""
    parser = subparsers.add_parser(
        "convert",
        help="convert a Caffe / Deep Compression / OpenVINO model to ONNX",
        description="Convert SOURCE [WEIGHTS] to ONNX: .prototxt + .caffemodel (Caffe), "
        ".prototxt + .net (Deep Compression), .xml [+ .bin] (OpenVINO IR). The preprocessing "
        "and label set are stored in the model's metadata.",
    )
    parser.add_argument("source", type=Path, help=".prototxt or OpenVINO .xml")
    parser.add_argument("weights", type=Path, nargs="?", help=".caffemodel, .net or .bin")
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="MODEL.onnx")
    pre = parser.add_argument_group("preprocessing (stored in the model)")
    pre.add_argument("--preset", choices=sorted(PRESETS), help="Caffe preprocessing of the dataset")
    pre.add_argument("--mean", type=Path, metavar="FILE.binaryproto", help="mean image to subtract")
    pre.add_argument("--mean-values", type=parse_floats, metavar="B,G,R",
                     help="per-channel means, in the model's channel order")
    pre.add_argument("--channel-order", choices=("RGB", "BGR"))
    pre.add_argument("--resize", type=parse_pair, metavar="H,W")
    pre.add_argument("--crop", type=parse_pair, metavar="H,W")
    pre.add_argument("--pixel-scale", type=parse_number, metavar="X", help="e.g. 1/255")
    pre.add_argument("--std", type=parse_floats, metavar="S1,S2,S3")
    pre.add_argument("--scale", type=parse_number, metavar="X", help="Caffe transform_param scale")
    pre.add_argument("--labels", choices=LABEL_SETS, help="label set (default: from the class count)")
    parser.set_defaults(func=run_convert)
