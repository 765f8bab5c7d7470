"""``dyvedeep convert`` on the command line: format detection, preprocessing presets and
overrides in the metadata, and bad inputs (one line on stderr naming the file, exit != 0, no
output file left behind)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from dyvedeep.cli import main
from dyvedeep.metadata_keys import LABELS_KEY, NONZERO_KEY, PREPROCESS_KEY, SOURCE_KEY
from dyvedeep.preprocess import Preprocess
from tests.factories.caffe import tiny_model, write_caffe_model, write_caffemodel, write_mean_binaryproto
from tests.factories.deep_compression import encode_deep_compression
from tests.factories.openvino import write_openvino_ir
from tests.factories.prototxts import DEEP_COMPRESSION_TINY, TINY_NETS


def metadata_of(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(path).metadata_props}


def assert_fails_cleanly(capsys, argv: list[str], out: Path, *needles: str) -> str:
    """Run the CLI expecting failure: non-zero exit, one stderr line naming ``needles``, no output."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dyvedeep: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")], "temporary file left"
    return lines[0]


# --------------------------------------------------------------------------- success


def test_cifar10_preset_with_mean_file(tmp_path):
    files = tiny_model(tmp_path, "global_pool")
    mean = np.arange(3 * 9 * 7, dtype=np.float32).reshape(3, 9, 7) / 7
    mean_file = tmp_path / "mean.binaryproto"
    write_mean_binaryproto(mean_file, mean)
    out = tmp_path / "models" / "tiny.onnx"
    argv = ["convert", str(files.prototxt), str(files.caffemodel), "-o", str(out),
            "--preset", "cifar10-caffe", "--mean", str(mean_file)]
    assert main(argv) == 0
    meta = metadata_of(out)
    preprocess = Preprocess.from_json(meta[PREPROCESS_KEY])
    assert preprocess.channel_order == "RGB" and preprocess.mean_shape == [3, 9, 7]
    np.testing.assert_array_equal(np.asarray(preprocess.mean_image, np.float32).reshape(3, 9, 7), mean)
    assert meta[LABELS_KEY] == "cifar10"
    assert json.loads(meta[SOURCE_KEY])["format"] == "caffe"


def test_imagenet_preset_and_overrides(tmp_path):
    files = write_caffe_model(tmp_path, "big_input", TINY_NETS["global_pool"].replace("dim: 9 dim: 7", "dim: 224 dim: 224"))
    out = tmp_path / "m.onnx"
    argv = ["convert", str(files.prototxt), str(files.caffemodel), "-o", str(out), "--preset", "imagenet-caffe-224",
            "--mean-values", "1,2,3", "--channel-order", "RGB", "--resize", "240,250", "--pixel-scale", "1/255",
            "--std", "0.5,0.25,0.125", "--scale", "2", "--labels", "imagenet"]
    assert main(argv) == 0
    meta = metadata_of(out)
    assert Preprocess.from_json(meta[PREPROCESS_KEY]) == Preprocess(
        channel_order="RGB", resize=[240, 250], crop=[224, 224], pixel_scale=1 / 255,
        mean_values=[1.0, 2.0, 3.0], std=[0.5, 0.25, 0.125], scale=2.0)
    assert meta[LABELS_KEY] == "imagenet"


def test_deep_compression_and_openvino_detected_from_names(tmp_path):
    files = write_caffe_model(tmp_path, "dc_tiny", DEEP_COMPRESSION_TINY)
    net_file = tmp_path / "dc_tiny.net"
    encode_deep_compression(net_file, files.net, files.weights)
    out = tmp_path / "dc.onnx"
    assert main(["convert", str(files.prototxt), str(net_file), "-o", str(out)]) == 0
    meta = metadata_of(out)
    assert json.loads(meta[SOURCE_KEY])["format"] == "deep_compression"
    assert meta[LABELS_KEY] == "cifar10" and NONZERO_KEY in meta  # 10 classes
    ir = write_openvino_ir(tmp_path / "ir")
    out = tmp_path / "ir.onnx"
    assert main(["convert", str(ir.xml), "-o", str(out)]) == 0, "the .bin beside the .xml is found"
    assert json.loads(metadata_of(out)[SOURCE_KEY]) == {"format": "openvino", "files": ["tiny_fire.xml", "tiny_fire.bin"]}


# --------------------------------------------------------------------------- failures


@pytest.fixture
def tiny(tmp_path):
    return tiny_model(tmp_path, "concat_eltwise_split")


def test_truncated_caffemodel(tmp_path, capsys, tiny):
    tiny.caffemodel.write_bytes(tiny.caffemodel.read_bytes()[:-37])
    out = tmp_path / "m.onnx"
    assert_fails_cleanly(capsys, ["convert", str(tiny.prototxt), str(tiny.caffemodel), "-o", str(out)],
                         out, str(tiny.caffemodel), "not a valid caffemodel")


def test_corrupt_caffemodel(tmp_path, capsys, tiny):
    data = bytearray(tiny.caffemodel.read_bytes())
    data[:12] = b"\xff" * 12
    tiny.caffemodel.write_bytes(bytes(data))
    out = tmp_path / "m.onnx"
    assert_fails_cleanly(capsys, ["convert", str(tiny.prototxt), str(tiny.caffemodel), "-o", str(out)],
                         out, str(tiny.caffemodel), "not a valid caffemodel")


def test_empty_caffemodel(tmp_path, capsys, tiny):
    tiny.caffemodel.write_bytes(b"")
    out = tmp_path / "m.onnx"
    assert_fails_cleanly(capsys, ["convert", str(tiny.prototxt), str(tiny.caffemodel), "-o", str(out)],
                         out, str(tiny.caffemodel))


def test_unknown_layer_type(tmp_path, capsys, tiny):
    prototxt = tmp_path / "odd.prototxt"
    prototxt.write_text(TINY_NETS["concat_eltwise_split"].replace('type: "Flatten"', 'type: "Frobnicate"'))
    out = tmp_path / "m.onnx"
    assert_fails_cleanly(capsys, ["convert", str(prototxt), str(tiny.caffemodel), "-o", str(out)],
                         out, str(prototxt), "'flat'", "Frobnicate")


def test_weight_shape_mismatch(tmp_path, capsys, tiny):
    prototxt = tmp_path / "wider.prototxt"
    prototxt.write_text(TINY_NETS["concat_eltwise_split"].replace("num_output: 6", "num_output: 7"))
    out = tmp_path / "m.onnx"
    assert_fails_cleanly(capsys, ["convert", str(prototxt), str(tiny.caffemodel), "-o", str(out)],
                         out, str(tiny.caffemodel), "'ip'", "[7, 320]", "[6, 320]")


def test_invalid_prototxt(tmp_path, capsys, tiny):
    prototxt = tmp_path / "broken.prototxt"
    prototxt.write_text("layer { name: 'x' \n type: ")
    out = tmp_path / "m.onnx"
    assert_fails_cleanly(capsys, ["convert", str(prototxt), str(tiny.caffemodel), "-o", str(out)], out, str(prototxt))


def test_truncated_net_file(tmp_path, capsys):
    files = write_caffe_model(tmp_path, "dc_tiny", DEEP_COMPRESSION_TINY)
    net_file = tmp_path / "dc_tiny.net"
    encode_deep_compression(net_file, files.net, files.weights)
    net_file.write_bytes(net_file.read_bytes()[:-1])
    out = tmp_path / "m.onnx"
    assert_fails_cleanly(capsys, ["convert", str(files.prototxt), str(net_file), "-o", str(out)],
                         out, str(net_file), "truncated")


def test_missing_weights_and_unknown_formats(tmp_path, capsys, tiny):
    out = tmp_path / "m.onnx"
    missing = tmp_path / "absent.caffemodel"
    assert_fails_cleanly(capsys, ["convert", str(tiny.prototxt), str(missing), "-o", str(out)], out, str(missing))
    assert_fails_cleanly(capsys, ["convert", str(tiny.prototxt), "-o", str(out)], out, str(tiny.prototxt))
    other = tmp_path / "weights.h5"
    other.write_bytes(b"x")
    assert_fails_cleanly(capsys, ["convert", str(tiny.prototxt), str(other), "-o", str(out)], out, str(other))


def test_preprocessing_that_does_not_fit_the_model(tmp_path, capsys, tiny):
    out = tmp_path / "m.onnx"
    assert_fails_cleanly(capsys, ["convert", str(tiny.prototxt), str(tiny.caffemodel), "-o", str(out),
                                  "--preset", "imagenet-caffe"], out, str(tiny.prototxt), "227")
    assert_fails_cleanly(capsys, ["convert", str(tiny.prototxt), str(tiny.caffemodel), "-o", str(out),
                                  "--preset", "cifar10-caffe"], out, "--mean")


def test_failure_keeps_an_existing_output(tmp_path, capsys, tiny):
    out = tmp_path / "m.onnx"
    assert main(["convert", str(tiny.prototxt), str(tiny.caffemodel), "-o", str(out)]) == 0
    before = out.read_bytes()
    tiny.caffemodel.write_bytes(tiny.caffemodel.read_bytes()[:100])
    assert main(["convert", str(tiny.prototxt), str(tiny.caffemodel), "-o", str(out)]) != 0
    assert "not a valid caffemodel" in capsys.readouterr().err
    assert out.read_bytes() == before


# --------------------------------------------------------------------------- bad input (issue 20)


def test_openvino_weights_with_nan_or_inf_are_refused(tmp_path, capsys):
    ir = write_openvino_ir(tmp_path / "ir")
    for value, name in ((b"\x00\x7e", "nan"), (b"\x00\x7c", "inf")):  # fp16 NaN, +Inf
        data = bytearray(ir.bin.read_bytes())
        data[6:8] = value  # the first weights Const starts at offset 0
        ir.bin.write_bytes(bytes(data))
        out = tmp_path / f"{name}.onnx"
        assert_fails_cleanly(capsys, ["convert", str(ir.xml), "-o", str(out)], out, "tiny_fire.bin", "NaN or Inf")


def test_deep_compression_weights_with_nan_are_refused(tmp_path, capsys):
    files = write_caffe_model(tmp_path, "dc_tiny", DEEP_COMPRESSION_TINY)
    first = next(iter(files.weights))
    files.weights[first][1][0] = np.nan  # a bias (stored as float32 in the .net)
    net_file = tmp_path / "dc_tiny.net"
    encode_deep_compression(net_file, files.net, files.weights)
    out = tmp_path / "m.onnx"
    assert_fails_cleanly(capsys, ["convert", str(files.prototxt), str(net_file), "-o", str(out)],
                         out, "dc_tiny.net", "NaN or Inf")


@pytest.mark.parametrize("old, new, needles", [
    ('<layer id="1" ', '<layer id="one" ', ("id", "'one'")),
    ("<dim>3</dim>", "<dim>x</dim>", ("dim", "'x'")),
    ('size="', 'size="1.5', ("size",)),
    ('shape="', 'shape="2,x,', ("shape",)),
    ('offset="0"', 'offset="zero"', ("offset",)),
    ('axis="1"', 'axis="one"', ("axis",)),
    (' from-port="0"', "", ("from-port", "missing")),
    ('strides="1, 1"', 'strides=""', ("strides",)),
    ('<dim>3</dim>', f'<dim>{"9" * 400}</dim>', ("dim", "out of range")),
])
def test_openvino_ir_fields_that_are_not_integers_are_one_line(old, new, needles, tmp_path, capsys):
    ir = write_openvino_ir(tmp_path / "ir")
    text = ir.xml.read_text()
    assert old in text
    ir.xml.write_text(text.replace(old, new, 1))
    out = tmp_path / "m.onnx"
    assert_fails_cleanly(capsys, ["convert", str(ir.xml), "-o", str(out)], out, "tiny_fire.xml", *needles)


def test_renamed_in_place_relu_top_is_refused(tmp_path, capsys, tiny):
    """One changed byte in an in-place ReLU's top would drop the ReLU and rewire the net."""
    prototxt = tmp_path / "renamed.prototxt"
    line = 'layer { name: "relu_c" type: "ReLU" bottom: "conv_c" top: "conv_c" }'
    text = TINY_NETS["concat_eltwise_split"]
    assert line in text
    prototxt.write_text(text.replace(line, line.replace('top: "conv_c"', 'top: "conv_d"')))
    out = tmp_path / "m.onnx"
    assert_fails_cleanly(capsys, ["convert", str(prototxt), str(tiny.caffemodel), "-o", str(out)],
                         out, "renamed.prototxt", "'relu_c'", "conv_d")


def test_transposed_inner_product_blob_of_the_right_size_is_refused(tmp_path, capsys):
    files = write_caffe_model(tmp_path, "t", TINY_NETS["concat_eltwise_split"])
    files.weights["ip"][0] = np.ascontiguousarray(files.weights["ip"][0].T)  # (320, 6) for (6, 320)
    write_caffemodel(files.caffemodel, files.net, files.weights)
    out = tmp_path / "m.onnx"
    assert_fails_cleanly(capsys, ["convert", str(files.prototxt), str(files.caffemodel), "-o", str(out)],
                         out, "t.caffemodel", "'ip'", "[6, 320]", "[320, 6]")


@pytest.mark.parametrize("where", ["directory", "under_a_file"])
def test_output_path_that_cannot_be_written_is_one_line(where, tmp_path, capsys, tiny):
    if where == "directory":
        out = tmp_path / "out.onnx"
        out.mkdir()
    else:
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "out.onnx"
    code = main(["convert", str(tiny.prototxt), str(tiny.caffemodel), "-o", str(out)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "out.onnx" in lines[0], lines
    assert not out.is_file()
