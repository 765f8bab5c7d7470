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
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .metadata_keys import LABELS_KEY, PREPROCESS_KEY

# plan.py still imports the keys from here under these names (it is outside this change).
METADATA_KEY = PREPROCESS_KEY
__all__ = ["LABELS_KEY", "METADATA_KEY", "Preprocess"]


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
        """Inverse of :meth:`to_json`."""
        return cls(**json.loads(text))

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
