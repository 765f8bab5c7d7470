"""Building the ONNX models the converters write (docs/architecture.md, "The ONNX models the
converters write"): a small graph builder that tracks tensor shapes, and the final assembly of
the model (opset 17, input ``data`` [N, C, H, W] with symbolic N, metadata)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import DyveError
from ..io_utils import atomic_path

OPSET = 17
IR_VERSION = 8  # the IR version that goes with opset 17; readable by older runtimes too
INPUT_NAME = "data"
BATCH_DIM = "N"

Shape = tuple[int, ...]  # a tensor's shape without the batch dimension


@dataclass
class GraphBuilder:
    """Collects nodes and initializers of one ONNX graph and the per-sample shape of every tensor.

    Shapes exclude the batch dimension: a [N, C, H, W] tensor is recorded as (C, H, W).
    """

    name: str
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)
    shapes: dict[str, Shape] = field(default_factory=dict)
    _names: set[str] = field(default_factory=set)

    def unique_name(self, hint: str) -> str:
        """``hint``, or ``hint`` with a numeric suffix if a tensor/initializer already has it."""
        name, k = hint, 1
        while name in self._names:
            k += 1
            name = f"{hint}_{k}"
        self._names.add(name)
        return name

    def reserve(self, name: str) -> None:
        """Claim ``name`` (e.g. the graph input) so that no other tensor gets it."""
        if name in self._names:
            raise ValueError(f"tensor name {name!r} used twice")
        self._names.add(name)

    def add_input(self, name: str, shape: Shape) -> str:
        """Declare the graph input (shape without batch) and return its name."""
        self.reserve(name)
        self.shapes[name] = tuple(int(d) for d in shape)
        return name

    def add_initializer(self, hint: str, array: np.ndarray) -> str:
        """Add a constant tensor (float32 data keeps its dtype; shapes as given)."""
        name = self.unique_name(hint)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def add_scalar(self, hint: str, value: float) -> str:
        """Add a float32 scalar constant."""
        return self.add_initializer(hint, np.array(value, dtype=np.float32))

    def add_int64(self, hint: str, values: Sequence[int]) -> str:
        """Add a 1-D int64 constant (pads, shapes, axes)."""
        return self.add_initializer(hint, np.asarray(list(values), dtype=np.int64))

    def add_node(
        self,
        op_type: str,
        inputs: Sequence[str],
        name: str,
        out_shape: Shape,
        output: str | None = None,
        **attrs: Any,
    ) -> str:
        """Append one single-output node; returns the output tensor's name.

        ``output`` is the wanted tensor name (made unique); by default the node's name.
        """
        out = self.unique_name(output or name)
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=name, **attrs))
        self.shapes[out] = tuple(int(d) for d in out_shape)
        return out

    def shape(self, tensor: str) -> Shape:
        """Per-sample shape of ``tensor``."""
        return self.shapes[tensor]

    def rename_tensor(self, old: str, new_hint: str) -> str:
        """Give tensor ``old`` a new (unique) name everywhere it appears; returns the new name."""
        new = self.unique_name(new_hint)
        for node in self.nodes:
            for i, x in enumerate(node.input):
                if x == old:
                    node.input[i] = new
            for i, x in enumerate(node.output):
                if x == old:
                    node.output[i] = new
        self.shapes[new] = self.shapes.pop(old)
        return new

    def rename_initializer(self, old: str, new_hint: str) -> str:
        """Give initializer ``old`` a new (unique) name in the initializers and node inputs."""
        new = self.unique_name(new_hint)
        for tensor in self.initializers:
            if tensor.name == old:
                tensor.name = new
        for node in self.nodes:
            for i, x in enumerate(node.input):
                if x == old:
                    node.input[i] = new
        return new

    def to_model(self, input_name: str, output_name: str, producer: str) -> onnx.ModelProto:
        """Assemble the model: float32 input/output with symbolic batch, opset 17."""
        in_shape = [BATCH_DIM, *self.shapes[input_name]]
        out_shape = [BATCH_DIM, *self.shapes[output_name]]
        graph = helper.make_graph(
            self.nodes,
            self.name,
            [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, in_shape)],
            [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, out_shape)],
            initializer=self.initializers,
        )
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name=producer
        )
        model.ir_version = IR_VERSION
        return model


@dataclass
class ConvertedModel:
    """A converter's result: the ONNX model and the metadata entries the format contributes
    (``dyvedeep.source``, and for Deep Compression ``dyvedeep.nonzero_weights``)."""

    model: onnx.ModelProto
    metadata: dict[str, str]


def set_metadata(model: onnx.ModelProto, entries: dict[str, str]) -> None:
    """Set (replace) metadata_props entries of ``model``."""
    kept = [p for p in model.metadata_props if p.key not in entries]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in entries.items():
        model.metadata_props.add(key=key, value=value)


def source_metadata(fmt: str, files: Sequence[Path]) -> str:
    """The ``dyvedeep.source`` value: the source format and the file names."""
    return json.dumps({"format": fmt, "files": [Path(f).name for f in files]}, sort_keys=True)


def check_and_save(model: onnx.ModelProto, out: Path, source: Path) -> None:
    """Write ``model`` atomically after validating it with onnx.checker (with shape inference).

    The bytes are checked as written (one serialization, also for large models); on failure
    no file is left under ``out``.
    """
    data = model.SerializeToString()
    with atomic_path(out) as tmp:
        tmp.write_bytes(data)
        try:
            onnx.checker.check_model(tmp, full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise DyveError(f"{source}: converted model fails the ONNX checker: {first}") from err
