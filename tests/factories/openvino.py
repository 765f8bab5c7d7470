"""OpenVINO IR files for the tests: a small SqueezeNet-like IR written as the Model Optimizer
writes SqueezeNet v1.1, with the equivalent Caffe net and its weights."""
from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dyvedeep import caffe_pb2
from tests.factories.caffe import (
    blob_shapes,
    conv_params,
    layers_of,
    net_input,
    parse_prototxt,
    pool_params,
    random_weights,
)
from tests.factories.prototxts import TINY_FIRE_PROTOTXT

@dataclass
class OpenVinoFiles:
    """An IR the factory wrote, with the equivalent Caffe net and the weights it holds."""

    xml: Path
    bin: Path
    net: caffe_pb2.NetParameter
    weights: dict[str, list[np.ndarray]]


class _IrWriter:
    """Accumulates IR layers, edges and the .bin blob."""

    def __init__(self, fp16: bool) -> None:
        self.fp16 = fp16
        self.layers = ET.Element("layers")
        self.edges = ET.Element("edges")
        self.blob = bytearray()
        self.next_id = 0

    def layer(self, name: str, op: str, version: str, data: dict[str, str] | None,
              inputs: list[tuple[int, int, tuple[int, ...]]], outputs: list[tuple[tuple[int, ...], str, str]]) -> list[int]:
        """Add a layer; ``inputs`` are (layer id, port, dims) sources; returns output port ids."""
        lid = self.next_id
        self.next_id += 1
        element = ET.SubElement(self.layers, "layer", id=str(lid), name=name, type=op, version=version)
        if data is not None:
            ET.SubElement(element, "data", data)
        if inputs:
            input_element = ET.SubElement(element, "input")
            for port, (src, src_port, dims) in enumerate(inputs):
                p = ET.SubElement(input_element, "port", id=str(port), precision="FP32")
                for d in dims:
                    ET.SubElement(p, "dim").text = str(d)
                ET.SubElement(self.edges, "edge", {"from-layer": str(src), "from-port": str(src_port),
                                                   "to-layer": str(lid), "to-port": str(port)})
        ports = []
        if outputs:
            output_element = ET.SubElement(element, "output")
            for k, (dims, precision, names) in enumerate(outputs):
                attrs = {"id": str(len(inputs) + k), "precision": precision}
                if names:
                    attrs["names"] = names
                p = ET.SubElement(output_element, "port", attrs)
                for d in dims:
                    ET.SubElement(p, "dim").text = str(d)
                ports.append(len(inputs) + k)
        self.last_id = lid
        return ports

    def const(self, name: str, array: np.ndarray) -> tuple[int, int, tuple[int, ...]]:
        """A (possibly FP16-compressed) float constant; returns its float32 source."""
        stored = array.astype(np.float16 if self.fp16 else np.float32)
        offset = len(self.blob)
        self.blob += stored.astype(stored.dtype.newbyteorder("<")).tobytes()
        kind, precision = ("f16", "FP16") if self.fp16 else ("f32", "FP32")
        shape = ", ".join(str(d) for d in array.shape)
        (port,) = self.layer(f"{name}_compressed" if self.fp16 else name, "Const", "opset1",
                             {"element_type": kind, "shape": shape, "offset": str(offset), "size": str(stored.nbytes)},
                             [], [(array.shape, precision, "")])
        source = (self.last_id, port, array.shape)
        if self.fp16:
            (port,) = self.layer(name, "Convert", "opset1", {"destination_type": "f32"}, [source],
                                 [(array.shape, "FP32", "")])
            source = (self.last_id, port, array.shape)
        return source


def write_openvino_ir(directory: Path, fp16: bool = True, seed: int = 0) -> OpenVinoFiles:
    """Write a small SqueezeNet-like IR (``tiny_fire.xml`` + ``.bin``) as the Model Optimizer
    writes SqueezeNet v1.1: FP16 Const + Convert, Convolution + Add bias, ReLU, MaxPool with
    ceil rounding, Concat, ReduceMean, SoftMax. Returns it with the equivalent Caffe net and
    the weights as stored (FP16-rounded when ``fp16``)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    net = parse_prototxt(TINY_FIRE_PROTOTXT)
    weights = random_weights(net, seed)
    if fp16:
        weights = {k: [a.astype(np.float16).astype(np.float32) for a in v] for k, v in weights.items()}
    shapes = blob_shapes(net)
    ir = _IrWriter(fp16)
    tensors: dict[str, tuple[int, int, tuple[int, ...]]] = {}
    _, in_dims = net_input(net)
    (port,) = ir.layer("data", "Parameter", "opset1", {"shape": ",".join(map(str, in_dims)), "element_type": "f32"},
                       [], [(in_dims, "FP32", "data")])
    tensors["data"] = (ir.last_id, port, in_dims)
    for layer in layers_of(net):
        if layer.type == "Input":
            continue
        out_dims = shapes[layer.top[0]]
        source = tensors[layer.bottom[0]]
        names = layer.top[0]
        if layer.type == "Convolution":
            (kh, kw), (ph, pw), (sh, sw), _ = conv_params(layer.param.convolution_param)
            w, b = weights[layer.name]
            w_src = ir.const(f"{layer.name}/weights", w)
            conv_data = {"strides": f"{sh}, {sw}", "dilations": "1, 1", "pads_begin": f"{ph}, {pw}",
                         "pads_end": f"{ph}, {pw}", "auto_pad": "explicit"}
            (port,) = ir.layer(f"{layer.name}/WithoutBiases", "Convolution", "opset1", conv_data,
                               [source, w_src], [(out_dims, "FP32", "")])
            conv_src = (ir.last_id, port, out_dims)
            b_src = ir.const(f"{layer.name}/Dims", b.reshape(1, -1, 1, 1))
            (port,) = ir.layer(layer.name, "Add", "opset1", {"auto_broadcast": "numpy"}, [conv_src, b_src],
                               [(out_dims, "FP32", names)])
        elif layer.type == "ReLU":
            (port,) = ir.layer(layer.name, "ReLU", "opset1", None, [source], [(out_dims, "FP32", names)])
        elif layer.type == "Pooling" and not layer.param.pooling_param.global_pooling:
            (k, _), (p, _), (s, _) = pool_params(layer.param.pooling_param)
            pool_data = {"strides": f"{s}, {s}", "dilations": "1, 1", "pads_begin": f"{p}, {p}",
                         "pads_end": f"{p}, {p}", "kernel": f"{k}, {k}", "rounding_type": "ceil",
                         "auto_pad": "explicit", "index_element_type": "i64", "axis": "0"}
            port, _ = ir.layer(layer.name, "MaxPool", "opset8", pool_data, [source],
                               [(out_dims, "FP32", names), (out_dims, "I64", "")])
        elif layer.type == "Pooling":
            axes = np.array([2, 3], np.int64)
            offset = len(ir.blob)
            ir.blob += axes.astype("<i8").tobytes()
            (axes_port,) = ir.layer(f"{layer.name}/axes", "Const", "opset1",
                                    {"element_type": "i64", "shape": "2", "offset": str(offset), "size": "16"},
                                    [], [((2,), "I64", "")])
            axes_src = (ir.last_id, axes_port, (2,))
            (port,) = ir.layer(f"{layer.name}/reduce", "ReduceMean", "opset1", {"keep_dims": "true"},
                               [source, axes_src], [(out_dims, "FP32", names)])
        elif layer.type == "Concat":
            sources = [tensors[b] for b in layer.bottom]
            (port,) = ir.layer(layer.name, "Concat", "opset1", {"axis": "1"}, sources, [(out_dims, "FP32", names)])
        elif layer.type == "Softmax":
            (port,) = ir.layer(layer.name, "SoftMax", "opset8", {"axis": "1"}, [source], [(out_dims, "FP32", names)])
        else:
            raise ValueError(layer.type)
        tensors[layer.top[0]] = (ir.last_id, port, out_dims)
    last = tensors["prob"]
    ir.layer("prob/sink_port_0", "Result", "opset1", None, [last], [])
    root = ET.Element("net", name="tiny_fire", version="11")
    root.append(ir.layers)
    root.append(ir.edges)
    xml_path, bin_path = directory / "tiny_fire.xml", directory / "tiny_fire.bin"
    ET.ElementTree(root).write(xml_path, encoding="utf-8", xml_declaration=True)
    bin_path.write_bytes(bytes(ir.blob))
    return OpenVinoFiles(xml_path, bin_path, net, weights)
