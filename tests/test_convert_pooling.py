"""Caffe pooling in ONNX: every small geometry (size, kernel, stride, pad) of MAX and AVE pooling
gives, in onnxruntime, exactly the output size and values of Caffe's pooling_layer.cpp."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from dyvedeep.convert.onnx_graph import GraphBuilder
from dyvedeep.convert.pooling import caffe_pool_axis, emit_caffe_average_pool, emit_max_pool
from tests.factories.caffe import pooled_size
from tests.factories.reference import ref_pooling


def geometries() -> list[tuple[int, int, int, int]]:
    """(size, kernel, stride, pad) that Caffe accepts and whose windows all touch the input."""
    cases = []
    for size in range(2, 9):
        for kernel in range(1, 5):
            for stride in range(1, 4):
                for pad in range(kernel):
                    if size + 2 * pad < kernel:
                        continue
                    if (pooled_size(size, kernel, stride, pad) - 1) * stride - pad >= size:
                        continue
                    cases.append((size, kernel, stride, pad))
    return cases


@pytest.mark.parametrize("method", ["MAX", "AVE"])
def test_all_small_geometries_match_caffe(method):
    rng = np.random.default_rng(0)
    emit = emit_max_pool if method == "MAX" else emit_caffe_average_pool
    checked = pad_nodes = 0
    for size, kernel, stride, pad in geometries():
        width = size + 1  # a second geometry on the other axis
        w_axis = caffe_pool_axis(width, max(1, kernel - 1), stride, min(pad, max(0, kernel - 2)))
        if w_axis.last_start >= width:
            continue
        graph = GraphBuilder("pool")
        graph.add_input("data", (2, size, width))
        out = emit(graph, "data", "pool", (caffe_pool_axis(size, kernel, stride, pad), w_axis), 2)
        pad_nodes += sum(n.op_type == "Pad" for n in graph.nodes)
        model = graph.to_model("data", out, "test")
        x = rng.standard_normal((1, 2, size, width)).astype(np.float32)
        (y,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"data": x})
        expected = ref_pooling(x.astype(np.float64), method, (kernel, w_axis.kernel), (pad, w_axis.pad), (stride, w_axis.stride))
        assert y.shape == expected.shape, (size, kernel, stride, pad)
        np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6, err_msg=str((size, kernel, stride, pad)))
        checked += 1
    assert checked > 150
    if method == "AVE":
        assert pad_nodes > 0, "the explicit-Pad route is exercised"
