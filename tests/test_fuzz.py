"""Seeded mutation fuzzing of every input format the command line reads (issue 20).

Each case mutates one valid file (byte flips, truncations, bad numbers, renamed names, removed
lines, broken metadata ...), runs the command in-process through :func:`dyvedeep.cli.main`, and
asserts the contract on it: exit 0 only when the command really succeeded (the output is there
and loads), else exit 2 (or 1 for a verify mismatch) with exactly one ``dyvedeep: error:`` line
on stderr, no traceback, no NUL byte, and nothing (not even a temporary file) at the output path.
The seeds are fixed, so a failure names a case that reproduces."""
from __future__ import annotations

import contextlib
import io
import json
import random
import re
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from dyvedeep.cli import main
from dyvedeep.convert import convert
from dyvedeep.preprocess import Preprocess
from tests.factories.caffe import tiny_model, write_caffe_model
from tests.factories.deep_compression import encode_deep_compression
from tests.factories.openvino import write_openvino_ir
from tests.factories.prototxts import DEEP_COMPRESSION_TINY

SEED = 20261203
# Cases per format (the closing note of issue 20 quotes these).
CASES = {
    "prototxt": 300,
    "caffemodel": 250,
    "deep_compression": 250,
    "openvino_xml": 300,
    "openvino_bin": 250,
    "onnx": 250,
    "knobs": 300,
    "npz": 250,
    "board": 250,
}
BAD_NUMBERS = ("0", "-1", "-3", "1e400", "-1e400", "nan", "inf", "0.5", "1.5", "x", "", "99999999999",
               "4" * 400, "0x10", "1e9", "2147483648", "-0", " ", "\x00", "\xff")


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str


def run_cli(argv: list[str]) -> Outcome:
    """``dyvedeep ARGV`` in-process; an exception escaping main is a contract failure (raised)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exit_:  # argparse
            code = exit_.code if isinstance(exit_.code, int) else 2
        except Exception as exc:  # noqa: BLE001  (the contract's "no traceback": report where)
            where = traceback.extract_tb(exc.__traceback__)[-1]
            return Outcome(-1, out.getvalue(), f"Traceback: {type(exc).__name__}: {str(exc)[:150]} "
                                               f"at {Path(where.filename).name}:{where.lineno}")
    return Outcome(code, out.getvalue(), err.getvalue())


PROGRESS_LINE = re.compile(r"[\w ./-]+: \d+/\d+ images \([\d.]+/s\)")


def contract_problem(outcome: Outcome, output: Path | None, allowed: tuple[int, ...] = (0, 2),
                     succeeded: Callable[[], bool] | None = None) -> str | None:
    """What breaks the contract in ``outcome`` (None when it holds)."""
    # the progress lines of long work (cli_support.Progress) may come before the one error line
    lines = [line for line in outcome.stderr.splitlines() if not PROGRESS_LINE.fullmatch(line)]
    if "Traceback" in outcome.stderr or "\x00" in outcome.stderr:
        return f"traceback or NUL on stderr: {outcome.stderr[-300:]!r}"
    if outcome.code not in allowed:
        return f"exit {outcome.code}: {outcome.stderr[-300:]!r}"
    if outcome.code == 0:
        if succeeded is not None and not succeeded():
            return "exit 0 without a usable output"
        return None
    if outcome.code == 2 or not outcome.stdout:
        if len(lines) != 1 or not lines[0].startswith("dyvedeep: error: "):
            return f"exit {outcome.code} with {len(lines)} stderr lines: {outcome.stderr[-400:]!r}"
    if output is not None:
        if output.exists():
            return f"exit {outcome.code} but {output} exists"
        left = [p.name for p in output.parent.glob(f".{output.name}.*")] if output.parent.is_dir() else []
        if left:
            return f"temporary files left: {left}"
    return None


# --------------------------------------------------------------------------- mutations


def mutate_bytes(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    """One byte-level mutation of ``data``: (what was done, the result)."""
    kind = rng.choice(("flip", "flip", "truncate", "insert", "delete", "zero", "duplicate", "nul"))
    n = len(data)
    at = rng.randrange(max(n, 1))
    if kind == "flip":
        b = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(max(n, 1))
            if i < n:
                b[i] ^= 1 << rng.randrange(8)
        return kind, bytes(b)
    if kind == "truncate":
        return f"truncate at {at}", data[:at]
    if kind == "insert":
        return f"insert at {at}", data[:at] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 16))) + data[at:]
    if kind == "delete":
        return f"delete at {at}", data[:at] + data[at + rng.randint(1, 64):]
    if kind == "zero":
        return f"0xff run at {at}", data[:at] + b"\xff" * 8 + data[at + 8:]
    if kind == "duplicate":
        return f"duplicate at {at}", data[:at] + data[at:at + 32] + data[at:]
    return f"NUL at {at}", data[:at] + b"\x00" + data[at:]


def mutate_text(rng: random.Random, text: str) -> tuple[str, bytes]:
    """One token- or line-level mutation of ``text`` (else a byte mutation)."""
    kind = rng.choice(("number", "number", "name", "line", "dup_line", "swap", "bytes", "quoted"))
    lines = text.splitlines(keepends=True)
    if kind == "number":
        spots = list(re.finditer(r"-?\d+(\.\d+)?(e-?\d+)?", text))
        if spots:
            m = rng.choice(spots)
            bad = rng.choice(BAD_NUMBERS)
            return f"number {m.group()!r} -> {bad!r} at {m.start()}", (text[:m.start()] + bad + text[m.end():]).encode("utf-8", "surrogateescape")
    if kind == "name":
        names = sorted(set(re.findall(r'"([A-Za-z_][\w/.-]*)"', text)))
        if len(names) >= 2:
            spots = [m for m in re.finditer(r'"([A-Za-z_][\w/.-]*)"', text)]
            m = rng.choice(spots)
            other = rng.choice(names)
            return f"name {m.group(1)!r} -> {other!r} at {m.start()}", (text[:m.start()] + f'"{other}"' + text[m.end():]).encode()
    if kind == "quoted":
        spots = list(re.finditer(r'"([^"\n]*)"', text))
        if spots:
            m = rng.choice(spots)
            bad = rng.choice(BAD_NUMBERS + ("", "[]", "{}", "NaN", "-", "1,2", "a b"))
            return f"value {m.group(1)!r} -> {bad!r} at {m.start()}", (text[:m.start()] + f'"{bad}"' + text[m.end():]).encode("utf-8", "surrogateescape")
    if kind in ("line", "dup_line", "swap") and len(lines) > 2:
        i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
        if kind == "line":
            return f"delete line {i + 1}", "".join(lines[:i] + lines[i + 1:]).encode()
        if kind == "dup_line":
            return f"duplicate line {i + 1}", "".join(lines[:i] + [lines[i]] + lines[i:]).encode()
        lines[i], lines[j] = lines[j], lines[i]
        return f"swap lines {i + 1}, {j + 1}", "".join(lines).encode()
    return mutate_bytes(rng, text.encode())


# --------------------------------------------------------------------------- valid inputs


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """One valid file (set) per format, and a small converted model with its data."""
    root = tmp_path_factory.mktemp("fuzz_sources")
    caffe = tiny_model(root / "caffe", "concat_eltwise_split")
    dc = write_caffe_model(root / "dc", "dc_tiny", DEEP_COMPRESSION_TINY)
    encode_deep_compression(root / "dc" / "dc_tiny.net", dc.net, dc.weights)
    ir = write_openvino_ir(root / "ir")
    model = root / "model.onnx"
    convert(caffe.prototxt, caffe.caffemodel, model, Preprocess(channel_order="RGB"), "cifar10")
    rng = np.random.default_rng(SEED)
    x = rng.normal(0, 1, (4, 3, 8, 8)).astype(np.float32)
    data = root / "data.npz"
    np.savez(data, x=x, y=np.array([0, 3, 5, 1], np.int64), ids=np.array(["a", "b", "c", "d"]),
             name=np.array("fuzz"), split=np.array("test"), label_set=np.array("cifar10"),
             preprocess=np.array(Preprocess(channel_order="RGB").to_json()))
    knobs = root / "knobs.yaml"
    knobs.write_text("model: model.onnx\nlayers:\n  conv_c:\n    spet:\n      enabled: true\n"
                     "      threshold: 0.5\n      fraction: 0.5\n  conv_a:\n    sdss:\n"
                     "      enabled: true\n      threshold: 0.25\n      stride: 2\n")
    board = root / "board.json"
    board.write_text(json.dumps({"host": "127.0.0.1", "port": 2222, "user": "pi", "key": str(root / "id_key"),
                                 "python": "python3", "workdir": "~/dyvedeep", "name": "pi",
                                 "emulated": True}, indent=1))
    return {"prototxt": caffe.prototxt, "caffemodel": caffe.caffemodel, "dc_prototxt": dc.prototxt,
            "dc_net": root / "dc" / "dc_tiny.net", "ir_xml": ir.xml, "ir_bin": ir.bin, "model": model,
            "data": data, "knobs": knobs, "board": board}


def onnx_loads(path: Path) -> Callable[[], bool]:
    def check() -> bool:
        try:
            onnx.checker.check_model(onnx.load(str(path)))
        except Exception:
            return False
        return True
    return check


def fuzz(name: str, case: Callable[[random.Random, int, Path], str | None], tmp_path: Path) -> None:
    """Run CASES[name] seeded cases of ``case``; fail listing every case that broke the contract."""
    rng = random.Random(f"{SEED}:{name}")
    problems = []
    for i in range(CASES[name]):
        work = tmp_path / f"{name}{i}"
        work.mkdir()
        problem = case(rng, i, work)
        if problem:
            problems.append(f"case {i}: {problem}")
    assert not problems, f"{len(problems)}/{CASES[name]} {name} cases broke the contract:\n" + "\n".join(problems[:15])


# --------------------------------------------------------------------------- per format


def convert_case(files: dict[str, bytes], argv: Callable[[dict[str, Path], Path], list]) -> Callable:
    """A convert case: write ``files`` (name -> bytes) into the work dir, convert, check."""
    def run(work: Path, what: str) -> str | None:
        paths = {}
        for fname, data in files.items():
            paths[fname] = work / fname
            paths[fname].write_bytes(data)
        out = work / "out" / "model.onnx"
        outcome = run_cli(argv(paths, out))
        problem = contract_problem(outcome, out, succeeded=onnx_loads(out))
        return f"{what}: {problem}" if problem else None
    return run


def test_fuzz_prototxt(sources, tmp_path):
    text, weights = sources["prototxt"].read_text(), sources["caffemodel"].read_bytes()

    def case(rng, i, work):
        what, data = mutate_text(rng, text)
        return convert_case({"m.prototxt": data, "m.caffemodel": weights},
                            lambda p, out: ["convert", p["m.prototxt"], p["m.caffemodel"], "-o", out])(work, what)
    fuzz("prototxt", case, tmp_path)


def test_fuzz_caffemodel(sources, tmp_path):
    proto, weights = sources["prototxt"].read_bytes(), sources["caffemodel"].read_bytes()

    def case(rng, i, work):
        what, data = mutate_bytes(rng, weights)
        return convert_case({"m.prototxt": proto, "m.caffemodel": data},
                            lambda p, out: ["convert", p["m.prototxt"], p["m.caffemodel"], "-o", out])(work, what)
    fuzz("caffemodel", case, tmp_path)


def test_fuzz_deep_compression(sources, tmp_path):
    proto, net = sources["dc_prototxt"].read_text(), sources["dc_net"].read_bytes()

    def case(rng, i, work):
        if rng.random() < 0.8:
            what, data = mutate_bytes(rng, net)
            files = {"m.prototxt": proto.encode(), "m.net": data}
        else:
            what, text = mutate_text(rng, proto)
            files = {"m.prototxt": text, "m.net": net}
        return convert_case(files, lambda p, out: ["convert", p["m.prototxt"], p["m.net"], "-o", out])(work, what)
    fuzz("deep_compression", case, tmp_path)


def test_fuzz_openvino_xml(sources, tmp_path):
    xml, weights = sources["ir_xml"].read_text(), sources["ir_bin"].read_bytes()

    def case(rng, i, work):
        what, data = mutate_text(rng, xml)
        return convert_case({"m.xml": data, "m.bin": weights}, lambda p, out: ["convert", p["m.xml"], "-o", out])(work, what)
    fuzz("openvino_xml", case, tmp_path)


def test_fuzz_openvino_bin(sources, tmp_path):
    xml, weights = sources["ir_xml"].read_bytes(), sources["ir_bin"].read_bytes()

    def case(rng, i, work):
        if rng.random() < 0.4:  # a weight set to NaN / Inf (fp16 or fp32)
            b = bytearray(weights)
            at = rng.randrange(0, len(b) - 4, 2)
            b[at:at + 2] = rng.choice((b"\x00\x7e", b"\x00\x7c", b"\x00\xfc"))  # fp16 NaN, +Inf, -Inf
            what, data = f"fp16 non-finite at {at}", bytes(b)
        else:
            what, data = mutate_bytes(rng, weights)
        return convert_case({"m.xml": xml, "m.bin": data}, lambda p, out: ["convert", p["m.xml"], "-o", out])(work, what)
    fuzz("openvino_bin", case, tmp_path)


def mutate_onnx(rng: random.Random, model: onnx.ModelProto) -> tuple[str, bytes]:
    """A structural mutation of a converted model (metadata, weights, attributes) or its bytes."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    kind = rng.choice(("metadata", "metadata", "weight", "attribute", "attribute", "dims", "bytes"))
    if kind == "metadata":
        prop = rng.choice(list(m.metadata_props))
        pre = json.loads(prop.value) if prop.key == "dyvedeep.preprocess" else None
        if pre is not None and rng.random() < 0.6:
            key = rng.choice(sorted(pre))
            pre[key] = rng.choice(("GBR", "", -1, 0, [], [0, 0], [1, -1], [1e400], "x", None, {"a": 1},
                                   [1.0, float("nan"), 2.0], 10 ** 400, 1.5, [3, 8, 8]))
            value = json.dumps(pre)
            what = f"preprocess {key} -> {pre[key]!r}"
        else:
            value = rng.choice(("", "{", "[]", "null", "imagenet", "mnist", '{"channel_order": "BGR"}', "\x00"))
            what = f"metadata {prop.key} -> {value!r}"
        prop.value = value
        return what, m.SerializeToString()
    if kind == "weight":
        init = rng.choice([t for t in m.graph.initializer if t.data_type == onnx.TensorProto.FLOAT])
        arr = numpy_helper.to_array(init).copy()
        arr.reshape(-1)[rng.randrange(arr.size)] = rng.choice((np.nan, np.inf, -np.inf, 3e38))
        init.CopyFrom(numpy_helper.from_array(arr, init.name))
        return f"weight {init.name}", m.SerializeToString()
    if kind == "attribute":
        node = rng.choice([n for n in m.graph.node if n.attribute] or list(m.graph.node))
        if node.attribute and rng.random() < 0.3:
            attr = rng.choice(list(node.attribute))
            node.attribute.remove(attr)
            return f"{node.name}: drop {attr.name}", m.SerializeToString()
        if node.attribute:
            attr = rng.choice(list(node.attribute))
            bad = rng.choice((0, -1, -5, 2 ** 31, 7, 1 << 40))
            if attr.ints:
                attr.ints[rng.randrange(len(attr.ints))] = bad
            elif attr.type == onnx.AttributeProto.INT:
                attr.i = bad
            elif attr.type == onnx.AttributeProto.FLOAT:
                attr.f = float("nan")
            return f"{node.name}: {attr.name} -> {bad}", m.SerializeToString()
    if kind == "dims":
        init = rng.choice(list(m.graph.initializer))
        if init.dims:
            init.dims[rng.randrange(len(init.dims))] = rng.choice((0, 1, 2, 1000))
            return f"dims of {init.name}", m.SerializeToString()
    return mutate_bytes(rng, model.SerializeToString())


def test_fuzz_onnx(sources, tmp_path):
    model = onnx.load(str(sources["model"]))

    def case(rng, i, work):
        what, data = mutate_onnx(rng, model)
        path = work / "m.onnx"
        path.write_bytes(data)
        if i % 2:
            outcome = run_cli(["verify", path, "--data", f"npz:{sources['data']}"])
            problem = contract_problem(outcome, None, allowed=(0, 1, 2),
                                       succeeded=lambda: "OK" in outcome.stdout)
        else:
            out = work / "eval.json"
            outcome = run_cli(["eval", path, "--data", f"npz:{sources['data']}", "--json", out])
            problem = contract_problem(outcome, out, succeeded=out.is_file)
        return f"{what}: {problem}" if problem else None
    fuzz("onnx", case, tmp_path)


def test_fuzz_knob_files(sources, tmp_path):
    text = sources["knobs"].read_text()

    def case(rng, i, work):
        what, data = mutate_text(rng, text)
        if rng.random() < 0.1:
            what, data = "empty", b""
        path = work / "k.yaml"
        path.write_bytes(data)
        out = work / "eval.json"
        outcome = run_cli(["eval", sources["model"], "--data", f"npz:{sources['data']}", "--knobs", path, "--json", out])
        problem = contract_problem(outcome, out, succeeded=out.is_file)
        return f"{what}: {problem}" if problem else None
    fuzz("knobs", case, tmp_path)


def mutate_npz(rng: random.Random, arrays: dict[str, np.ndarray], raw: bytes) -> tuple[str, bytes]:
    kind = rng.choice(("array", "array", "array", "drop", "bytes", "npy"))
    a = {k: v.copy() for k, v in arrays.items()}
    if kind == "array":
        key = rng.choice(sorted(a))
        bad = rng.choice((
            lambda v: np.full_like(v, np.nan) if v.dtype.kind == "f" else v.astype(str),
            lambda v: v.astype(np.float64),
            lambda v: v[:1],
            lambda v: v.reshape(-1),
            lambda v: np.array(["x"] * max(len(np.atleast_1d(v)), 1)),
            lambda v: np.array([999, -3, 0, 1]) if v.ndim == 1 else v[..., :2],
            lambda v: np.array([0.5, 1, 2, 3]),
            lambda v: np.array("mnist"),
            lambda v: np.array('{"channel_order": "GBR"}'),
            lambda v: np.zeros((0,) + v.shape[1:], v.dtype),
        ))
        try:
            a[key] = bad(a[key])
        except (ValueError, IndexError):  # e.g. ids as float, a slice of a 0-d array
            a[key] = np.array([])
        what = f"array {key}"
    elif kind == "drop":
        key = rng.choice(sorted(a))
        del a[key]
        what = f"drop {key}"
    elif kind == "npy":
        buf = io.BytesIO()
        np.save(buf, a["x"])
        return "plain .npy", buf.getvalue()
    else:
        return mutate_bytes(rng, raw)
    buf = io.BytesIO()
    np.savez(buf, **a)
    return what, buf.getvalue()


def test_fuzz_npz_data(sources, tmp_path):
    raw = sources["data"].read_bytes()
    with np.load(sources["data"]) as z:
        arrays = {k: z[k] for k in z.files}

    def case(rng, i, work):
        what, data = mutate_npz(rng, arrays, raw)
        path = work / "d.npz"
        path.write_bytes(data)
        if i % 2:
            outcome = run_cli(["verify", sources["model"], "--data", f"npz:{path}"])
            problem = contract_problem(outcome, None, allowed=(0, 1, 2), succeeded=lambda: "OK" in outcome.stdout)
        else:
            out = work / "eval.json"
            outcome = run_cli(["eval", sources["model"], "--data", f"npz:{path}", "--json", out])
            problem = contract_problem(outcome, out, succeeded=out.is_file)
        return f"{what}: {problem}" if problem else None
    fuzz("npz", case, tmp_path)


def test_fuzz_board_files(sources, tmp_path):
    """Board files with a missing local data file: every case must fail before connecting."""
    board = json.loads(sources["board"].read_text())

    def case(rng, i, work):
        if rng.random() < 0.5:
            what, data = mutate_text(rng, sources["board"].read_text())
        else:
            b = dict(board)
            key = rng.choice(sorted(b) + ["extra"])
            value = rng.choice((None, -1, 0, 70000, "22", "x", [], {}, [22], 1.5, True, "", "\x00", "a" * 5000, 10 ** 400))
            b[key] = value
            if rng.random() < 0.1:
                b = [b]
            what, data = f"{key} -> {value!r}"[:80], json.dumps(b).encode()
        path = work / "board.json"
        path.write_bytes(data)
        out = work / "r.json"
        outcome = run_cli(["remote", "eval", "--board", path, sources["model"], "--knobs", sources["knobs"],
                           "--data-npz", work / "absent.npz", "--json", out])
        problem = contract_problem(outcome, out, allowed=(2,))
        return f"{what}: {problem}" if problem else None
    fuzz("board", case, tmp_path)
