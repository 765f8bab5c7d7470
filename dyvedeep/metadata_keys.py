"""The ONNX ``metadata_props`` keys the harness writes and reads: one home for each key's name
(the converters write them, the planner, evaluation, data export and tests read them)."""
from __future__ import annotations

PREPROCESS_KEY = "dyvedeep.preprocess"
"""JSON of :class:`dyvedeep.preprocess.Preprocess`: how raw pixels become the input tensor."""

LABELS_KEY = "dyvedeep.labels"
"""The label set of the model's outputs (``cifar10`` or ``imagenet``), where known."""

LABEL_SET_CLASSES = {"cifar10": 10, "imagenet": 1000}
"""The values of :data:`LABELS_KEY` and their number of classes (labels run 0 .. classes - 1)."""

LABEL_SETS = tuple(LABEL_SET_CLASSES)

SOURCE_KEY = "dyvedeep.source"
"""JSON ``{"format": ..., "files": [...]}``: the source format and the converted files' names."""

NONZERO_KEY = "dyvedeep.nonzero_weights"
"""JSON ``{initializer: count}``: non-zero weights of a pruned (Deep Compression) model."""
