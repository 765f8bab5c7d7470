"""Input preprocessing of a model, carried in its ONNX metadata (key ``dyvedeep.preprocess``).

The converters write it; the dataset loaders apply it. Order of operations on one RGB uint8
image of shape (H, W, 3):

1. ``resize`` [h, w]: warp to that size (bilinear, as Caffe's OpenCV resize), if given;
2. ``crop`` [h, w]: centre crop, if given;
3. to float32, channels first, in ``channel_order`` ("RGB" or "BGR");
4. ``pixel_scale``: multiply (1.0 keeps 0..255; 1/255 gives 0..1);
5. subtract ``mean_image`` (shape ``mean_shape`` = C x H x W, same channel order) or
   ``mean_values`` (one per channel), if given;
6. divide by ``std`` (one per channel), if given;
7. multiply by ``scale`` (Caffe's transform_param scale).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


MAX_SIZE = 1 << 16  # pixels per side; beyond it a resize or crop is a broken file


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_list(key: str, values: Any, length: int | None, integer: bool = False, low: float | None = None) -> None:
    """ValueError unless ``values`` is None or a list of ``length`` finite numbers (integers >= low)."""
    if values is None:
        return
    if not isinstance(values, list) or (length is not None and len(values) != length):
        raise ValueError(f"{key} must be a list of {length or 'some'} numbers, got {_shown(values)}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
            raise ValueError(f"{key} must hold {'integers' if integer else 'numbers'}, got {_shown(v)}")
        try:
            finite = math.isfinite(float(v))
        except OverflowError:
            finite = False
        if not finite or (low is not None and v < low) or (integer and v > MAX_SIZE):
            raise ValueError(f"{key} holds {_shown(v)}, out of range")


@dataclass
class Preprocess:
    """How raw RGB pixels become the model's input tensor."""

    channel_order: str = "BGR"
    resize: list[int] | None = None
    crop: list[int] | None = None
    pixel_scale: float = 1.0
    mean_values: list[float] | None = None
    mean_image: list[float] | None = None
    mean_shape: list[int] | None = None
    std: list[float] | None = None
    scale: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        """Serialise for ONNX metadata (float32 means round-trip exactly through repr)."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Preprocess":
        """Inverse of :meth:`to_json`; ValueError naming the field when ``text`` is not a valid
        preprocessing (the callers add the file)."""
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as err:
            raise ValueError(f"not valid JSON ({str(err)[:60]})") from None
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(map(str, unknown))[:60]}")
        preprocess = cls(**data)
        preprocess.validate()
        return preprocess

    def validate(self) -> None:
        """ValueError naming the first field that is not what the loaders can apply."""
        if self.channel_order not in ("RGB", "BGR"):
            raise ValueError(f"channel_order must be RGB or BGR, got {_shown(self.channel_order)}")
        for key in ("resize", "crop"):
            _check_list(key, getattr(self, key), 2, integer=True, low=1)
        _check_list("mean_shape", self.mean_shape, 3, integer=True, low=1)
        for key in ("pixel_scale", "scale"):
            _check_list(key, [getattr(self, key)], 1)
        for key in ("mean_values", "std"):
            _check_list(key, getattr(self, key), None)
        if self.std is not None and 0 in self.std:
            raise ValueError("std holds a zero")
        if (self.mean_image is None) != (self.mean_shape is None):
            raise ValueError("mean_image and mean_shape go together")
        if self.mean_image is not None:
            _check_list("mean_image", self.mean_image, int(np.prod(self.mean_shape, dtype=np.int64)))
        if not isinstance(self.extra, dict):
            raise ValueError(f"extra must be a mapping, got {_shown(self.extra)}")

    def input_hw(self) -> tuple[int, int] | None:
        """Spatial size of the model input this preprocessing produces, when it is fixed."""
        if self.crop:
            return int(self.crop[0]), int(self.crop[1])
        if self.resize:
            return int(self.resize[0]), int(self.resize[1])
        if self.mean_shape:
            return int(self.mean_shape[1]), int(self.mean_shape[2])
        return None

    def apply(self, rgb: np.ndarray) -> np.ndarray:
        """Turn one RGB uint8 image (H, W, 3), already resized, into float32 (C, H, W).

        Resizing needs an image library and is done by the dataset loader (steps 1); this does
        the crop and steps 3-7.
        """
        img = rgb
        if self.crop:
            ch, cw = int(self.crop[0]), int(self.crop[1])
            top = (img.shape[0] - ch) // 2
            left = (img.shape[1] - cw) // 2
            img = img[top : top + ch, left : left + cw]
        x = np.ascontiguousarray(img.transpose(2, 0, 1)).astype(np.float32)
        if self.channel_order.upper() == "BGR":
            x = x[::-1].copy()
        elif self.channel_order.upper() != "RGB":
            raise ValueError(f"channel_order must be RGB or BGR, not {self.channel_order!r}")
        if self.pixel_scale != 1.0:
            x *= np.float32(self.pixel_scale)
        if self.mean_image is not None:
            mean = np.asarray(self.mean_image, dtype=np.float32).reshape(self.mean_shape)
            x -= mean
        elif self.mean_values is not None:
            x -= np.asarray(self.mean_values, dtype=np.float32)[:, None, None]
        if self.std is not None:
            x /= np.asarray(self.std, dtype=np.float32)[:, None, None]
        if self.scale != 1.0:
            x *= np.float32(self.scale)
        return x
