"""Knob files: which dynamic-effort knob is on in which layer, with its threshold and options.

A knob file is YAML::

    model: cifar10_quick.onnx        # informative
    layers:
      conv2:
        spet: {enabled: true, threshold: 0.5, fraction: 0.5}
        sdss: {enabled: true, threshold: 0.2, stride: 2, fill: bilinear}
        sfma: {enabled: true, threshold: 0.05}

Thresholds (the rules are a reconstruction of the DyVEDeep papers, see docs/knobs.md):
- SPET: margin t >= 0; a neuron stops when its partial sum < -t (``.inf`` never fires). With
  ``test: bound`` (beyond the reconstruction) t is a scale: a neuron stops when its partial sum
  < -t x the largest sum its other inputs can add (1: exact; below 1: predictive; ``.inf``
  never fires).
- SDSS: significance t >= 0; a cell is interpolated when all its corners are < t (0 never fires).
- SFMA: relative spread t >= 0; a map is replaced by its mean when spread < t (0 never fires).

Decision gates (beyond the specification, docs/gates.md) are an optional top-level key; their
weights live in a sidecar npz file beside the knob file, named with its sha256::

    gates:
      weights: KNOBS.gates.npz       # a file name, resolved beside the knob file
      sha256: 3f5a...                # of that file, checked when the gates load
      after:
        - {layer: pool1, threshold: 0.93, confidence: softmax}

A gate exits when its confidence (max softmax probability, or ``margin``: the top two
probabilities' difference) is >= its threshold (anything above 1 never exits). A knob file with
gates runs on ``dyvedeep.gates.GatedEngine``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import DyveError
from .io_utils import read_text_limited, write_text_atomic
from .plan import Layer, Op, Plan

KNOB_NAMES = ("sfma", "sdss", "spet")  # order of application inside a layer

#: Options of each knob with the specification's defaults and their allowed values.
DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {
    "spet": {"fraction": 0.5, "order": "shared", "test": "margin"},
    "sdss": {"stride": 2, "fill": "bilinear"},
    "sfma": {"statistic": "relative_std", "border": "exact"},
}
ALLOWED_CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("spet", "order"): ("shared",),
    ("spet", "test"): ("margin", "bound"),  # bound: beyond the reconstruction (docs/knobs.md)
    ("sdss", "fill"): ("bilinear", "zero"),
    ("sfma", "statistic"): ("relative_std", "std"),
    ("sfma", "border"): ("exact", "interior"),
}


@dataclass
class KnobSetting:
    """One knob of one layer."""

    enabled: bool
    threshold: float
    options: dict[str, Any] = field(default_factory=dict)

    def option(self, knob: str, name: str) -> Any:
        """The option's value, or the specification's default."""
        return self.options.get(name, DEFAULT_OPTIONS[knob][name])


#: A decision gate's confidence measures (docs/gates.md).
GATE_CONFIDENCES = ("softmax", "margin")
#: The keys of a knob file's ``gates`` mapping and of each gate in its ``after`` list.
GATES_KEYS = ("weights", "sha256", "after")
GATE_KEYS = ("layer", "threshold", "confidence")


@dataclass
class GateSetting:
    """One decision gate: after which layer, its threshold and its confidence measure."""

    layer: str
    threshold: float
    confidence: str = "softmax"


@dataclass
class GateSettings:
    """The decision gates of a knob file (beyond the specification, docs/gates.md)."""

    weights: str  # the sidecar npz's file name, beside the knob file
    sha256: str
    after: list[GateSetting] = field(default_factory=list)
    knob_file: Path | None = None  # where the settings were read from (not written)

    def weights_path(self, knob_file: Path | None = None) -> Path:
        """The sidecar npz: ``weights`` beside the knob file."""
        base = knob_file if knob_file is not None else self.knob_file
        return (base.parent if base is not None else Path(".")) / self.weights

    def copy(self) -> "GateSettings":
        return GateSettings(self.weights, self.sha256, [GateSetting(g.layer, g.threshold, g.confidence)
                                                        for g in self.after], self.knob_file)

    def to_dict(self) -> dict[str, Any]:
        return {"weights": self.weights, "sha256": self.sha256,
                "after": [{"layer": g.layer, "threshold": g.threshold if math.isfinite(g.threshold) else float("inf"),
                           "confidence": g.confidence} for g in self.after]}


@dataclass
class KnobConfig:
    """Knob settings per layer name and knob name (and optionally decision gates)."""

    layers: dict[str, dict[str, KnobSetting]] = field(default_factory=dict)
    model: str | None = None
    gates: GateSettings | None = None

    def get(self, layer: str, knob: str) -> KnobSetting | None:
        """The enabled setting of ``knob`` in ``layer``, or None when it is off."""
        setting = self.layers.get(layer, {}).get(knob)
        return setting if setting is not None and setting.enabled else None

    def set(self, layer: str, knob: str, threshold: float, **options: Any) -> None:
        """Turn ``knob`` on in ``layer`` with ``threshold``."""
        self.layers.setdefault(layer, {})[knob] = KnobSetting(True, float(threshold), dict(options))

    def disable(self, layer: str, knob: str) -> None:
        """Turn ``knob`` off in ``layer``."""
        self.layers.get(layer, {}).pop(knob, None)

    def copy(self) -> "KnobConfig":
        """A deep copy."""
        return KnobConfig({l: {k: KnobSetting(s.enabled, s.threshold, dict(s.options)) for k, s in ks.items()}
                           for l, ks in self.layers.items()}, self.model,
                          self.gates.copy() if self.gates is not None else None)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for YAML."""
        layers = {}
        for lname, knobs in self.layers.items():
            entry = {}
            for kname, s in knobs.items():
                thr = s.threshold if math.isfinite(s.threshold) else float("inf")
                entry[kname] = {"enabled": s.enabled, "threshold": thr, **s.options}
            if entry:
                layers[lname] = entry
        out: dict[str, Any] = {"layers": layers}
        if self.model:
            out["model"] = self.model
        if self.gates is not None:
            out["gates"] = self.gates.to_dict()
        return out

    def save(self, path: str | Path) -> None:
        """Write as YAML, atomically."""
        write_text_atomic(path, yaml.safe_dump(self.to_dict(), sort_keys=True))


KNOB_FILE_MAX_BYTES = 1 << 20
"""Knob files are a few kB; anything past this is refused before YAML parses it."""

MAX_SDSS_STRIDE = 1 << 16
"""SDSS strides past this cannot fit any input (and would make the engine allocate for them)."""


def applicable_knobs(layer: Layer) -> tuple[str, ...]:
    """The knobs that can act on ``layer`` (SPET and SDSS need a ReLU; SDSS and SFMA a conv)."""
    if layer.op == Op.CONV:
        knobs = ["sfma"]
        if layer.relu and layer.out_shape[1] >= 2 and layer.out_shape[2] >= 2:
            knobs.append("sdss")
        if layer.relu:
            knobs.append("spet")
        return tuple(knobs)
    if layer.op == Op.FC and layer.relu:
        return ("spet",)
    return ()


def _number(value: Any) -> float | None:
    """``value`` as a float, or None (bools, strings, NaN, integers too large for a float)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return None if math.isnan(number) else number


def _shown(value: Any) -> str:
    """``value`` for a message: short (a 400-digit number would make the line unreadable)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_threshold(path: Path, lname: str, kname: str, value: Any) -> float:
    number = _number(value)
    if number is None:
        raise DyveError(f"{path}: layer {lname}, knob {kname}: threshold must be a number "
                        f"(not NaN, fitting a float), got {_shown(value)}")
    if number < 0:
        raise DyveError(f"{path}: layer {lname}, knob {kname}: threshold must be >= 0, got {_shown(value)}")
    return number


def _check_option(path: Path, lname: str, kname: str, name: str, value: Any) -> Any:
    if name not in DEFAULT_OPTIONS[kname]:
        raise DyveError(f"{path}: layer {lname}, knob {kname}: unknown option {name!r} "
                        f"(known: enabled, threshold, {', '.join(DEFAULT_OPTIONS[kname])})")
    choices = ALLOWED_CHOICES.get((kname, name))
    if choices is not None and value not in choices:
        raise DyveError(f"{path}: layer {lname}, knob {kname}: option {name} must be one of {', '.join(choices)}, got {_shown(value)}")
    if (kname, name) == ("spet", "fraction"):
        number = _number(value)
        if number is None or not 0 < number <= 1:
            raise DyveError(f"{path}: layer {lname}, knob spet: fraction must be a number in (0, 1], got {_shown(value)}")
        return number
    if (kname, name) == ("sdss", "stride"):
        if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= MAX_SDSS_STRIDE:
            raise DyveError(f"{path}: layer {lname}, knob sdss: stride must be an integer in "
                            f"[2, {MAX_SDSS_STRIDE}], got {_shown(value)}")
    return value


def parse_knobs(data: Any, plan: Plan, path: Path) -> KnobConfig:
    """Validate knob data against the model's layers; every problem is one line naming ``path``."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise DyveError(f"{path}: a knob file must be a mapping with a 'layers' key")
    unknown_top = set(data) - {"layers", "model", "budget", "calibration", "gates"}
    if unknown_top:
        raise DyveError(f"{path}: unknown key(s) {', '.join(sorted(unknown_top))} (known: layers, model, gates)")
    layers = data.get("layers") or {}
    if not isinstance(layers, dict):
        raise DyveError(f"{path}: 'layers' must map layer names to knobs")
    by_name = {layer.name: layer for layer in plan.layers}
    config = KnobConfig(model=data.get("model"))
    for lname, knobs in layers.items():
        if lname not in by_name:
            compute = ", ".join(l.name for l in plan.compute_layers())
            raise DyveError(f"{path}: unknown layer {lname!r} (the model's conv/fc layers: {compute})")
        if not isinstance(knobs, dict):
            raise DyveError(f"{path}: layer {lname}: expected a mapping of knobs")
        allowed = applicable_knobs(by_name[lname])
        for kname, spec in knobs.items():
            if kname not in KNOB_NAMES:
                raise DyveError(f"{path}: layer {lname}: unknown knob {kname!r} (known: {', '.join(KNOB_NAMES)})")
            if kname not in allowed:
                raise DyveError(f"{path}: layer {lname}: knob {kname} does not apply to this layer "
                                f"(applicable: {', '.join(allowed) or 'none'})")
            if not isinstance(spec, dict):
                raise DyveError(f"{path}: layer {lname}, knob {kname}: expected a mapping with enabled/threshold")
            enabled = spec.get("enabled", True)
            if not isinstance(enabled, bool):
                raise DyveError(f"{path}: layer {lname}, knob {kname}: enabled must be true or false, got {enabled!r}")
            if "threshold" not in spec:
                raise DyveError(f"{path}: layer {lname}, knob {kname}: missing threshold")
            threshold = _check_threshold(path, lname, kname, spec["threshold"])
            options = {k: _check_option(path, lname, kname, k, v)
                       for k, v in spec.items() if k not in ("enabled", "threshold")}
            config.layers.setdefault(lname, {})[kname] = KnobSetting(enabled, threshold, options)
    if data.get("gates") is not None:
        config.gates = parse_gates(data["gates"], plan, path)
    return config


def parse_gates(data: Any, plan: Plan, path: Path) -> GateSettings:
    """Validate a knob file's ``gates`` mapping (the weights are checked when they load:
    ``dyvedeep.gates.load_gates``)."""
    if not isinstance(data, dict):
        raise DyveError(f"{path}: gates must be a mapping with keys {', '.join(GATES_KEYS)}")
    unknown = set(data) - set(GATES_KEYS)
    missing = [k for k in GATES_KEYS if k not in data]
    if unknown or missing:
        what = f"unknown key(s) {', '.join(sorted(map(str, unknown)))}" if unknown else f"missing {', '.join(missing)}"
        raise DyveError(f"{path}: gates: {what} (keys: {', '.join(GATES_KEYS)})")
    weights, digest = data["weights"], data["sha256"]
    if not isinstance(weights, str) or not weights or Path(weights).name != weights or weights in (".", ".."):
        raise DyveError(f"{path}: gates: weights must be a file name beside the knob file, got {_shown(weights)}")
    if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise DyveError(f"{path}: gates: sha256 must be 64 lowercase hex digits, got {_shown(digest)}")
    after = data["after"]
    if not isinstance(after, list) or not after:
        raise DyveError(f"{path}: gates: after must be a non-empty list of gates")
    by_name = {layer.name: layer for layer in plan.layers}
    settings = GateSettings(weights, digest, [], path)
    for i, gate in enumerate(after):
        where = f"{path}: gates: gate {i + 1}"
        if not isinstance(gate, dict):
            raise DyveError(f"{where}: expected a mapping with keys {', '.join(GATE_KEYS)}")
        unknown = set(gate) - set(GATE_KEYS)
        if unknown:
            raise DyveError(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))} (keys: {', '.join(GATE_KEYS)})")
        lname = gate.get("layer")
        if not isinstance(lname, str) or lname not in by_name:
            raise DyveError(f"{where}: unknown layer {_shown(lname)}")
        if len(by_name[lname].out_shape) != 3:
            raise DyveError(f"{where}: layer {lname}: a gate needs a feature map (C, H, W) there, "
                            f"not shape {by_name[lname].out_shape}")
        if any(g.layer == lname for g in settings.after):
            raise DyveError(f"{where}: a second gate after layer {lname}")
        if "threshold" not in gate:
            raise DyveError(f"{where}: missing threshold")
        threshold = _number(gate["threshold"])
        if threshold is None or threshold < 0:
            raise DyveError(f"{where}: threshold must be a number >= 0, got {_shown(gate['threshold'])}")
        confidence = gate.get("confidence", GATE_CONFIDENCES[0])
        if confidence not in GATE_CONFIDENCES:
            raise DyveError(f"{where}: confidence must be one of {', '.join(GATE_CONFIDENCES)}, got {_shown(confidence)}")
        settings.after.append(GateSetting(lname, threshold, confidence))
    return settings


def load_knobs(path: str | Path, plan: Plan) -> KnobConfig:
    """Read and validate a knob file for ``plan`` (at most :data:`KNOB_FILE_MAX_BYTES`, UTF-8,
    one YAML mapping with a ``layers`` key)."""
    path = Path(path)
    text = read_text_limited(path, KNOB_FILE_MAX_BYTES, "a knob file")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise DyveError(f"{path}: not valid YAML{where}") from None
    except RecursionError:
        raise DyveError(f"{path}: nested too deeply to be a knob file") from None
    if data is None:
        raise DyveError(f"{path}: the knob file is empty (expected a mapping with a 'layers' key)")
    return parse_knobs(data, plan, path)
