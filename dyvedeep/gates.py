"""Decision gates (beyond the specification: the network-level comparison family of issue 17,
Shafiee, Shafiee, Wong, arXiv 1811.01476; docs/gates.md): after chosen layers, a small classifier
on the globally average-pooled features (one fully connected layer, one output per class) stops
inference for an image when its confidence reaches the gate's threshold.

- :class:`Gate`: one gate's weights, threshold and confidence measure, and its decision (one
  call of the Cython ``GateKernel``);
- :func:`gate_costs`: the gate's own ops (docs/ops.md, decision gate row);
- :class:`GatedEngine`: an :class:`~dyvedeep.engine.Engine` whose compiled runs are split at the
  gates, run segment by segment (``Engine.run_range``), a gate deciding after each segment (gates
  decide first; SPET, SDSS and SFMA act in the layers that run); :class:`GateCounter` its counter;
- the weights' sidecar npz (:func:`save_gate_weights`, :func:`load_gates`), checked against the
  sha256 that the knob file names.
"""
from __future__ import annotations

import hashlib
import io
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from . import _kernels as K
from .engine import DEFAULT_TUNING, Engine, EngineTuning, batch_and_outputs, set_blas_threads
from .engine.counting import OpCounter, neuron_costs
from .errors import DyveError
from .io_utils import atomic_path, read_bytes_limited
from .knobs import KnobConfig
from .plan import Plan

#: The sidecar's suffix: KNOBS.yaml -> KNOBS.gates.npz.
SIDECAR_SUFFIX = ".gates.npz"
#: Gate weights are a few kB per gate; a larger sidecar is refused before it is read.
SIDECAR_MAX_BYTES = 64 << 20


def sidecar_path(knob_file: str | Path) -> Path:
    """Where the gates' weights of ``knob_file`` go: beside it, ``<stem>.gates.npz``."""
    knob_file = Path(knob_file)
    return knob_file.with_name(knob_file.stem + SIDECAR_SUFFIX)


def pooled_features(feature_map: np.ndarray) -> np.ndarray:
    """Global average pooling of a (C, H, W) map: C features (float64), as a gate computes them."""
    x = np.ascontiguousarray(feature_map, dtype=np.float32).reshape(feature_map.shape[0], -1)
    out = np.empty(x.shape[0], np.float64)
    K.gate_pool(x, out)
    return out


def gate_costs(channels: int, height: int, width: int, classes: int, confidence: str) -> dict[str, int]:
    """A gate's own ops for one image (docs/ops.md, decision gate), in the dense layers'
    accounting: global average pooling H*W per channel (adds + divide); the fully connected
    layer 2 per MAC + 1 per output (bias); softmax (K - 1) compares + 4 K; the confidence
    (K - 1) compares for the largest probability, for ``margin`` (K - 2) more for the second and
    1 subtract; 1 compare with the threshold. Its kernel runs exactly the fully-connected MACs
    (``executed_macs``)."""
    fc = neuron_costs(classes, channels, relu=False)
    softmax = (classes - 1) + 4 * classes
    conf = (classes - 1) + ((classes - 2) + 1 if confidence == "margin" else 0)
    ops = channels * height * width + fc["ops"] + softmax + conf + 1
    return {"macs": fc["macs"], "executed_macs": fc["macs"], "nonzero_macs": fc["macs"], "ops": ops, "gate_ops": ops}


@dataclass
class Gate:
    """A decision gate after layer ``layer`` (the plan's ``index``-th): logits = weight @ GAP + bias;
    its decision runs in one kernel call (K.GateKernel, which copies the weights when the gate is
    made) on buffers allocated once."""

    layer: str
    index: int
    weight: np.ndarray  # (classes, channels), float64
    bias: np.ndarray  # (classes,), float64
    threshold: float
    confidence: str = "softmax"
    kernel: K.GateKernel = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.kernel = K.GateKernel(np.ascontiguousarray(self.weight, np.float64),
                                   np.ascontiguousarray(self.bias, np.float64), self.confidence == "margin")

    def decide(self, feature_map: np.ndarray) -> tuple[np.ndarray, float, bool]:
        """The gate's class probabilities on one (C, H, W) map, its confidence, and whether it exits."""
        conf = self.kernel.decide(np.ascontiguousarray(feature_map, dtype=np.float32))
        return self.kernel.probs.copy(), conf, conf >= self.threshold

    def decide_pooled(self, features: np.ndarray) -> tuple[np.ndarray, float, bool]:
        """As :meth:`decide`, on the map's pooled features (:func:`pooled_features`)."""
        conf = self.kernel.decide_pooled(np.ascontiguousarray(features, np.float64))
        return self.kernel.probs.copy(), conf, conf >= self.threshold

    def costs(self, plan: Plan) -> dict[str, int]:
        """The gate's own ops per image it decides on (:func:`gate_costs`)."""
        c, h, w = plan.layers[self.index].out_shape
        return gate_costs(c, h, w, self.weight.shape[0], self.confidence)


# ----------------------------------------------------------------------------- sidecar npz


def _weight_key(layer: str) -> str:
    return f"weight:{layer}"


def _bias_key(layer: str) -> str:
    return f"bias:{layer}"


def save_gate_weights(path: str | Path, weights: dict[str, tuple[np.ndarray, np.ndarray]]) -> str:
    """Write the gates' weights (layer -> (weight, bias)) to ``path`` atomically; returns its sha256."""
    arrays: dict[str, np.ndarray] = {}
    for layer, (w, b) in weights.items():
        arrays[_weight_key(layer)] = np.asarray(w, np.float64)
        arrays[_bias_key(layer)] = np.asarray(b, np.float64)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    raw = buf.getvalue()
    with atomic_path(path) as tmp:
        tmp.write_bytes(raw)
    return hashlib.sha256(raw).hexdigest()


def load_gates(config: KnobConfig, plan: Plan) -> list[Gate]:
    """The gates of ``config`` with their weights from the sidecar npz, in the plan's layer order.
    A sidecar that is missing, changed since the knob file named it (sha256), or whose arrays do
    not fit the model is one line naming it."""
    settings = config.gates
    if settings is None:
        return []
    path = settings.weights_path()
    raw = read_bytes_limited(path, SIDECAR_MAX_BYTES, f"the gates' weights named by {settings.knob_file}")
    digest = hashlib.sha256(raw).hexdigest()
    if digest != settings.sha256:
        raise DyveError(f"{path}: sha256 {digest[:16]}... is not the {settings.sha256[:16]}... that "
                        f"{settings.knob_file} names (the gates' weights changed since calibration)")
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as err:
        raise DyveError(f"{path}: not an npz file of gate weights ({str(err).splitlines()[0] if str(err) else err})") from None
    index = {layer.name: i for i, layer in enumerate(plan.layers)}
    classes = int(np.prod(plan.output_shape))
    gates = []
    for setting in settings.after:
        i = index[setting.layer]
        channels = plan.layers[i].out_shape[0]
        w, b = arrays.get(_weight_key(setting.layer)), arrays.get(_bias_key(setting.layer))
        if w is None or b is None:
            raise DyveError(f"{path}: no weights for the gate after layer {setting.layer}")
        if w.shape != (classes, channels) or b.shape != (classes,):
            raise DyveError(f"{path}: gate after {setting.layer}: weight {w.shape} and bias {b.shape}, expected "
                            f"({classes}, {channels}) and ({classes},) (classes x the layer's channels)")
        if w.dtype.kind != "f" or b.dtype.kind != "f" or not (np.isfinite(w).all() and np.isfinite(b).all()):
            raise DyveError(f"{path}: gate after {setting.layer}: weights must be finite floats")
        gates.append(Gate(setting.layer, i, w.astype(np.float64), b.astype(np.float64), setting.threshold,
                          setting.confidence))
    return sorted(gates, key=lambda g: g.index)


# ----------------------------------------------------------------------------- running


def run_segments(engine: Engine, image: np.ndarray, stops: list[int]) -> Iterator[tuple[int | None, dict]]:
    """Run ``engine`` on one image in segments, each ending after one of ``stops`` (increasing
    layer indices), then to the output; yields (stop or None at the end, the tensors made so far
    as views of the engine's buffers, valid until the next segment runs). A consumer that stops
    early skips every later layer. An engine built with these stops as its ``segment_ends`` runs
    the segments through its compiled runs (Engine.run_range), any other layer by layer."""
    compiled = engine.compiled_runs is not None and set(stops) <= engine.segment_ends
    image = np.ascontiguousarray(image, dtype=np.float32)
    values: dict[str, np.ndarray] | None = None
    start = 0
    for stop in stops:
        if compiled:
            values = engine.run_range(image, start, stop + 1)
        else:
            values = engine.forward(image if start == 0 else None, start, values, stop + 1, banded=True)
        start = stop + 1
        yield stop, values
    if compiled:
        yield None, engine.run_range(image, start, None)
    else:
        yield None, engine.forward(image if start == 0 else None, start, values, None, banded=True)


class GateCounter(OpCounter):
    """The OpCounter of a GatedEngine: per gate, the images that reached it and those that exited
    there are two ints on the hot path (``reached``, ``exited``), added to the gate's row
    (its costs times the images reached, and ``exits``) whenever the table is read, as OpCounter
    folds in the layers' knob-free runs: an add per gate and image costs several microseconds."""

    def __init__(self, base: OpCounter, gates: list[Gate], costs: list[dict[str, int]]) -> None:
        super().__init__(base.layer_names, base.dense_rows, base.band_rows)
        self.sources = base.sources
        self.gate_rows = [g.index for g in gates]
        self.gate_costs = costs
        self.reached = [0] * len(gates)
        self.exited = [0] * len(gates)

    @property
    def table(self) -> np.ndarray:
        for g, row in enumerate(self.gate_rows):
            reached, exited = self.reached[g], self.exited[g]
            if reached:
                self.reached[g] = self.exited[g] = 0
                self.add(row, {**{k: v * reached for k, v in self.gate_costs[g].items()}, "exits": exited})
        return super().table


class GatedEngine:
    """An Engine with decision gates (beyond the specification, docs/gates.md): the layers run
    in order up to each gate, which decides first; on an exit the image's output is the gate's
    class probabilities and no later layer runs. The other knobs of the knob file act in the
    layers that run. Ops: the layers run plus the gates evaluated (their row in the counter is
    the layer they follow, fields ``gate_ops`` and ``exits``).

    The engine's compiled runs are split at the gates (``segment_ends``): each segment runs as
    compiled runs (Engine.run_range), each gate decides in one kernel call, and the gates' ops
    are tallied as two ints per gate (GateCounter)."""

    def __init__(self, plan: Plan, knobs: KnobConfig, threads: int = 1, tuning: EngineTuning = DEFAULT_TUNING) -> None:
        self.plan = plan
        self.knobs = knobs
        self.gates = load_gates(knobs, plan)
        inner = knobs.copy()
        inner.gates = None
        self.engine = Engine(plan, inner, threads, tuning=tuning, segment_ends=[g.index for g in self.gates])
        self.gate_costs = [g.costs(plan) for g in self.gates]
        self.counter = self.engine.counter = GateCounter(self.engine.counter, self.gates, self.gate_costs)
        self.threads = self.engine.threads
        # per gate: the first layer of its segment, one past its layer, and its map's name
        starts = [0] + [g.index + 1 for g in self.gates[:-1]]
        self._segments = [(start, g.index + 1, plan.layers[g.index].output, g) for start, g in zip(starts, self.gates)]
        self._rest = self.gates[-1].index + 1 if self.gates else 0

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Outputs (N, ...) of a batch of preprocessed inputs (N, C, H, W)."""
        batch, outputs = batch_and_outputs(self.plan, batch)
        set_blas_threads(self.threads)
        for n in range(batch.shape[0]):
            outputs[n] = self._run_one(batch[n])[0]
        return outputs

    def run_image(self, image: np.ndarray) -> tuple[np.ndarray, int | None]:
        """One image's output and the position of the gate it exited at (None: it ran to the end)."""
        output, g = self._run_one(np.ascontiguousarray(image, dtype=np.float32))
        return np.array(output, copy=True), g

    def _run_one(self, image: np.ndarray) -> tuple[np.ndarray, int | None]:
        """One image (C-contiguous float32): its output (a view, valid until the next image) and
        the gate it exited at."""
        run_range, reached = self.engine.run_range, self.counter.reached
        for g, (start, stop, name, gate) in enumerate(self._segments):
            values = run_range(image, start, stop)
            reached[g] += 1
            if gate.kernel.decide(values[name]) >= gate.threshold:
                self.counter.exited[g] += 1
                return gate.kernel.probs.reshape(self.plan.output_shape), g
        return run_range(image, self._rest, None)[self.plan.output_name], None


def engine_for(plan: Plan, knobs: KnobConfig | None, threads: int = 1) -> Engine | GatedEngine:
    """The engine a knob file runs on: a GatedEngine when it has gates, else an Engine."""
    if knobs is not None and knobs.gates is not None:
        return GatedEngine(plan, knobs, threads)
    return Engine(plan, knobs, threads)


def exit_rates(knobs: KnobConfig, layers: list[str], exits: list[int], n: int) -> list[dict[str, Any]]:
    """Per gate of ``knobs``: its layer, threshold, confidence, exits and exit rate (% of the
    ``n`` images), from the per-layer ``exits`` counts."""
    if knobs.gates is None:
        return []
    by_layer = dict(zip(layers, exits))
    return [{"layer": g.layer, "threshold": g.threshold, "confidence": g.confidence,
             "exits": int(by_layer.get(g.layer, 0)), "exit_rate": 100.0 * by_layer.get(g.layer, 0) / max(n, 1)}
            for g in knobs.gates.after]
