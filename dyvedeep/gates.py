"""Decision gates (beyond the specification: the network-level comparison family of issue 17,
Shafiee, Shafiee, Wong, arXiv 1811.01476; docs/gates.md): after chosen layers, a small classifier
on the globally average-pooled features (one fully connected layer, one output per class) stops
inference for an image when its confidence reaches the gate's threshold.

- :class:`Gate`: one gate's weights, threshold and confidence measure, and its decision;
- :func:`gate_costs`: the gate's own ops (docs/ops.md, decision gate row);
- :class:`GatedEngine`: an :class:`~dyvedeep.engine.Engine` run layer segment by segment, a gate
  deciding after each segment (gates decide first; SPET, SDSS and SFMA act in the layers that run);
- the weights' sidecar npz (:func:`save_gate_weights`, :func:`load_gates`), checked against the
  sha256 that the knob file names.
"""
from __future__ import annotations

import hashlib
import io
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .engine import DEFAULT_TUNING, Engine, EngineTuning, set_blas_threads
from .engine.counting import neuron_costs
from .errors import DyveError
from .io_utils import atomic_path
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
    """Global average pooling of a (C, H, W) map: C features (float64)."""
    return feature_map.reshape(feature_map.shape[0], -1).mean(axis=1, dtype=np.float64)


def softmax_confidence(logits: np.ndarray, confidence: str) -> tuple[np.ndarray, float]:
    """The softmax probabilities of ``logits`` and the confidence: the largest probability
    (``softmax``) or the difference of the two largest (``margin``)."""
    z = np.exp(logits - logits.max())
    probs = z / z.sum()
    if confidence == "softmax":
        return probs, float(probs.max())
    top2 = np.partition(probs, probs.size - 2)[-2:]
    return probs, float(top2[1] - top2[0])


def gate_costs(channels: int, height: int, width: int, classes: int, confidence: str) -> dict[str, int]:
    """A gate's own ops for one image (docs/ops.md, decision gate), in the dense layers'
    accounting: global average pooling H*W per channel (adds + divide); the fully connected
    layer 2 per MAC + 1 per output (bias); softmax (K - 1) compares + 4 K; the confidence
    (K - 1) compares for the largest probability, for ``margin`` (K - 2) more for the second and
    1 subtract; 1 compare with the threshold."""
    fc = neuron_costs(classes, channels, relu=False)
    softmax = (classes - 1) + 4 * classes
    conf = (classes - 1) + ((classes - 2) + 1 if confidence == "margin" else 0)
    ops = channels * height * width + fc["ops"] + softmax + conf + 1
    return {"macs": fc["macs"], "ops": ops, "gate_ops": ops}


@dataclass
class Gate:
    """A decision gate after layer ``layer`` (the plan's ``index``-th): logits = weight @ GAP + bias."""

    layer: str
    index: int
    weight: np.ndarray  # (classes, channels), float64
    bias: np.ndarray  # (classes,), float64
    threshold: float
    confidence: str = "softmax"

    def decide(self, feature_map: np.ndarray) -> tuple[np.ndarray, float, bool]:
        """The gate's class probabilities on one (C, H, W) map, its confidence, and whether it exits."""
        probs, conf = softmax_confidence(self.weight @ pooled_features(feature_map) + self.bias, self.confidence)
        return probs, conf, conf >= self.threshold

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
    try:
        with open(path, "rb") as f:
            raw = f.read(SIDECAR_MAX_BYTES + 1)
    except OSError as err:
        raise DyveError(f"{path}: cannot read the gates' weights named by {settings.knob_file} ({err.strerror})") from None
    if len(raw) > SIDECAR_MAX_BYTES:
        raise DyveError(f"{path}: larger than {SIDECAR_MAX_BYTES} bytes; not the gates' weights")
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
    layer indices), then to the output; yields (stop or None at the end, the tensors made so
    far as views of the engine's buffers, valid until the next segment runs). A consumer that
    stops early skips every later layer."""
    values: dict[str, np.ndarray] | None = None
    start = 0
    for stop in stops:
        values = engine.forward(image if start == 0 else None, start, values, stop + 1, banded=True)
        start = stop + 1
        yield stop, values
    yield None, engine.forward(image if start == 0 else None, start, values, None, banded=True)


class GatedEngine:
    """An Engine with decision gates (beyond the specification, docs/gates.md): the layers run
    in order up to each gate, which decides first; on an exit the image's output is the gate's
    class probabilities and no later layer runs. The other knobs of the knob file act in the
    layers that run. Ops: the layers run plus the gates evaluated (their row in the counter is
    the layer they follow, fields ``gate_ops`` and ``exits``)."""

    def __init__(self, plan: Plan, knobs: KnobConfig, threads: int = 1, tuning: EngineTuning = DEFAULT_TUNING) -> None:
        self.plan = plan
        self.knobs = knobs
        self.gates = load_gates(knobs, plan)
        inner = knobs.copy()
        inner.gates = None
        self.engine = Engine(plan, inner, threads, tuning=tuning)
        self.counter = self.engine.counter
        self.threads = self.engine.threads
        self.gate_costs = [g.costs(plan) for g in self.gates]

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Outputs (N, ...) of a batch of preprocessed inputs (N, C, H, W)."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if batch.ndim != 4 or tuple(batch.shape[1:]) != tuple(self.plan.input_shape):
            raise DyveError(f"{self.plan.path}: input shape {tuple(batch.shape)} does not match the model's "
                            f"(N, {', '.join(map(str, self.plan.input_shape))})")
        outputs = np.empty((batch.shape[0],) + tuple(self.plan.output_shape), np.float32)
        set_blas_threads(self.threads)
        for n in range(batch.shape[0]):
            outputs[n] = self.run_image(batch[n])[0]
        return outputs

    def run_image(self, image: np.ndarray) -> tuple[np.ndarray, int | None]:
        """One image's output and the position of the gate it exited at (None: it ran to the end)."""
        segments = run_segments(self.engine, image, [g.index for g in self.gates])
        for g, (stop, values) in enumerate(segments):
            if stop is None:
                return values[self.plan.output_name], None
            gate = self.gates[g]
            probs, _, exits = gate.decide(values[self.plan.layers[stop].output])
            self.counter.add(gate.index, {**self.gate_costs[g], "exits": int(exits)})
            if exits:
                segments.close()
                return probs.reshape(self.plan.output_shape), g
        raise AssertionError("run_segments ends with the output")


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
