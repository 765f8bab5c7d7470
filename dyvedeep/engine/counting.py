"""Op accounting: the :class:`OpCounter` shared by every kernel path, and one cost function per
knob decision, each the formula of its row in docs/ops.md ("What the knobs add and save").

The dense counts of every layer are the plan's (``Layer.dense_macs``, ``Layer.dense_ops``); a
layer run on its knob-free path is counted as one more run of its dense row. Beside the MACs the
op model counts (``macs``), ``executed_macs`` counts those the kernels ran (docs/ops.md,
"Executed MACs"): the knob conv kernel counts its own, the other paths' are below.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from ..plan import Plan

#: Counter columns: one row per layer.
COUNTER_FIELDS = (
    "images", "macs", "executed_macs", "nonzero_macs", "ops",
    "overhead_sfma", "overhead_sdss", "overhead_spet",
    "saved_sfma", "saved_sdss", "saved_spet",
    "dropped_maps", "filled", "terminated", "fallbacks",
    # decision gates (docs/gates.md), in the row of the layer a gate follows: its own ops (also in
    # ``ops``) and the images that exited there
    "gate_ops", "exits",
)
#: Scalar ops of one bilinear fill (three lerps of 3 ops each); a zero fill costs nothing.
BILINEAR_FILL_OPS = 9
#: Scalar ops to turn one map's sums into its spread and test it (mean, variance, sqrt, ratio, compare).
SFMA_TEST_OPS = 7


class OpCounter:
    """Exact per-layer totals over the images run: MACs, scalar ops, and per knob the overhead
    ops it added and the ops it saved. One instance is shared by every kernel path."""

    def __init__(self, layer_names: list[str], dense_rows: np.ndarray | None = None,
                 band_rows: np.ndarray | None = None) -> None:
        self.layer_names = list(layer_names)
        self.index = {name: i for i, name in enumerate(layer_names)}
        self._table = np.zeros((len(layer_names), len(COUNTER_FIELDS)), dtype=np.int64)
        self.col = {name: j for j, name in enumerate(COUNTER_FIELDS)}
        # Layers run on their knob-free path are counted by run (one int per layer, no per-field
        # work on the hot path) and folded in as multiples of their dense row when read.
        self.dense_rows = (dense_rows if dense_rows is not None
                           else np.zeros((len(layer_names), len(COUNTER_FIELDS)), dtype=np.int64))
        self.plain_runs = [0] * len(layer_names)
        # A conv run band by band with its max-pooling (engine/bands.py) is a knob-free run that
        # also runs the rows its bands share again: one more int per layer, folded in as
        # multiples of its band row (the MACs run past the dense ones).
        self.band_rows = (band_rows if band_rows is not None
                          else np.zeros((len(layer_names), len(COUNTER_FIELDS)), dtype=np.int64))
        self.band_runs = [0] * len(layer_names)
        # Compiled layers that keep their own totals (SFMA alone, engine/sfma_alone.py): per layer a
        # function giving the counts since its last call, folded in when read.
        self.sources: list[tuple[int, Callable[[], dict[str, int]]]] = []

    def add_source(self, index: int, counts_since: Callable[[], dict[str, int]]) -> None:
        """Row ``index`` also gets, when read, what ``counts_since()`` returns (the counts since
        its last call)."""
        self.sources.append((index, counts_since))

    @classmethod
    def for_plan(cls, plan: Plan) -> "OpCounter":
        """A zeroed counter of ``plan`` whose dense rows are the plan's dense counts."""
        dense_rows = np.zeros((len(plan.layers), len(COUNTER_FIELDS)), np.int64)
        for i, layer in enumerate(plan.layers):
            macs = layer.dense_macs if layer.is_compute else 0
            nonzero = layer.nonzero_macs if layer.is_compute else 0
            dense_rows[i, [COUNTER_FIELDS.index(f) for f in ("images", "macs", "executed_macs", "nonzero_macs", "ops")]] = \
                (1, macs, macs, nonzero, layer.dense_ops)  # the knob-free kernels run exactly the layer's MACs
        return cls([layer.name for layer in plan.layers], dense_rows)

    def set_banded(self, index: int, executed_macs: int) -> None:
        """Layer ``index`` may also run band by band, running ``executed_macs`` MACs then
        (:func:`conv_band_macs`); those runs are counted in ``plain_runs`` and ``band_runs``."""
        col = self.col["executed_macs"]
        self.band_rows[index, col] = executed_macs - self.dense_rows[index, col]

    @property
    def table(self) -> np.ndarray:
        """The per-layer totals (layers x COUNTER_FIELDS)."""
        if any(self.plain_runs):
            self._table += np.asarray(self.plain_runs, dtype=np.int64)[:, None] * self.dense_rows
            self.plain_runs = [0] * len(self.layer_names)
        if any(self.band_runs):
            self._table += np.asarray(self.band_runs, dtype=np.int64)[:, None] * self.band_rows
            self.band_runs = [0] * len(self.layer_names)
        for index, counts_since in self.sources:
            self.add(index, counts_since())
        return self._table

    def add(self, index: int, counts: dict[str, int]) -> None:
        """Add ``counts`` (field -> value, any of COUNTER_FIELDS) to row ``index``."""
        unknown = counts.keys() - self.col.keys()
        if unknown:
            raise KeyError(f"not counter fields: {sorted(unknown)}")
        self._table[index] += np.array([counts.get(f, 0) for f in COUNTER_FIELDS], dtype=np.int64)

    def get(self, layer: str, key: str) -> int:
        """Total of ``key`` for ``layer``."""
        return int(self.table[self.index[layer], self.col[key]])

    def total(self, key: str) -> int:
        """Sum of ``key`` over layers."""
        return int(self.table[:, self.col[key]].sum())


def new_counts() -> dict[str, int]:
    """A zero per-field tally of one layer and image (the knob path's scratch count)."""
    return dict.fromkeys(COUNTER_FIELDS, 0)


def tally(count: dict[str, int], costs: dict[str, int]) -> None:
    """Add ``costs`` (field -> value) to ``count``."""
    for key, value in costs.items():
        count[key] += value


# ----------------------------------------------------------------------------- per knob


def neuron_costs(n: int, kdim: int, relu: bool) -> dict[str, int]:
    """``n`` conv neurons computed in full over ``kdim`` inputs (docs/ops.md, dense layers:
    2 per MAC, 1 for the bias, 1 for a folded ReLU)."""
    return {"macs": n * kdim, "ops": 2 * n * kdim + n * (1 + int(relu))}


def spet_neuron_costs(n: int, terminated: int, kdim: int, lead: int, relu: bool) -> dict[str, int]:
    """``n`` neurons under SPET, ``terminated`` of them stopped after their ``lead`` leading inputs
    (docs/ops.md, SPET: 1 compare per tested neuron; saved: a stopped neuron's remaining MACs and
    its ReLU). The compare is counted as overhead (added to ``ops`` with the other overheads)."""
    finished = n - terminated
    macs = n * lead + finished * (kdim - lead)
    return {"macs": macs, "ops": 2 * macs + n + finished * int(relu), "overhead_spet": n,
            "saved_spet": 2 * terminated * (kdim - lead) + terminated * int(relu), "terminated": terminated}


def spet_bound_channel_ops(channels: int, elements: int, outputs: int, rest: int, nonneg: bool) -> int:
    """SPET's ``test: bound`` margins of a conv group for one input of ``channels`` maps of
    ``elements`` values, ``rest`` channels past the lead (docs/ops.md, SPET bound): per map its
    largest value (elements - 1 compares), and the largest of those (channels - 1); unless the
    input is known >= 0 (after a ReLU) the same for the smallest, each clamped to 0 (2 per map)
    and the range (1 subtract). Per output: 2 per MAC over the rest channels (x 2 for the
    smallest values), and 3 for the rounding allowance (multiply, add) and its constant (add)."""
    extremes = channels * max(elements - 1, 0) + max(channels - 1, 0)
    if not nonneg:
        extremes = 2 * extremes + 2 * channels + 1
    return extremes + outputs * (2 * rest * (1 if nonneg else 2) + 3)


def spet_bound_shared_ops(elements: int, outputs: int, nonneg: bool) -> int:
    """The same for a fully-connected layer: one range for all ``elements`` inputs (its largest
    value, and unless known >= 0 its smallest, both clamped to 0), the weight sums of the rest
    static; per output 1 multiply and 1 add (x 2 when the input may be negative)."""
    extremes = max(elements - 1, 0) * (1 if nonneg else 2) + (0 if nonneg else 2)
    return extremes + outputs * (2 if nonneg else 4)


def fc_spet_costs(outputs: int, inputs: int, lead: int, terminated: int) -> dict[str, int]:
    """A fully-connected layer (ReLU folded) under SPET, one image: the SPET row of docs/ops.md,
    its overhead included in ``ops`` (bias add and compare per neuron, ReLU per finished neuron).
    Its kernels run exactly these MACs: the lead for every output, the rest for each output
    that goes on (one dot product each); ``nonzero_macs`` as many, unless fc_spet finds zero
    weights (a pruned layer) and counts those on non-zero ones."""
    macs = outputs * lead + (outputs - terminated) * (inputs - lead)
    return {"images": 1, "macs": macs, "executed_macs": macs, "nonzero_macs": macs,
            "ops": 2 * macs + outputs + outputs + (outputs - terminated),
            "overhead_spet": outputs, "saved_spet": 2 * terminated * (inputs - lead) + terminated,
            "terminated": terminated}


def fallback_costs(dense_macs: int) -> dict[str, int]:
    """A layer whose knobs skipped nothing for an image is run again on its knob-free path (the
    knob-free floats, bit for bit): its ops stay the knob path's, its kernels run the layer's
    ``dense_macs`` once more."""
    return {"fallbacks": 1, "executed_macs": dense_macs}


def conv_band_macs(band_rows: list[int], wo: int, cout: int, kdim: int) -> int:
    """MACs a conv run band by band with its max-pooling runs (engine/bands.py): every output
    row of every band (``band_rows``; the rows neighbouring bands share are run in each) of
    ``wo`` positions and ``cout`` channels, ``kdim`` MACs each."""
    return sum(band_rows) * wo * cout * kdim


def sdss_decision_ops(maps: int, grid_points: int, cells: int) -> int:
    """SDSS's test of the cells (docs/ops.md, SDSS): 1 compare per grid point per map, 3 ANDs
    per cell per map."""
    return maps * grid_points + 3 * maps * cells


def sdss_fill_costs(filled: int, bilinear: bool, kdim: int, relu: bool) -> dict[str, int]:
    """``filled`` interpolated positions (docs/ops.md, SDSS): 9 ops per bilinear fill, none per
    zero fill; saved: each position's MACs, bias add and ReLU."""
    return {"filled": filled, "overhead_sdss": filled * (BILINEAR_FILL_OPS if bilinear else 0),
            "saved_sdss": filled * (2 * kdim + 1 + int(relu))}


def sfma_select_ops(maps: int, elements: int, nonneg: bool, relative: bool) -> int:
    """SFMA's statistic of ``maps`` input maps of ``elements`` each (docs/ops.md, SFMA): 3 per
    element (sum; square, add), 2 more when the input may be negative (abs, add), SFMA_TEST_OPS
    per map; for the relative spread the layer mean (1 add per map + 1 divide)."""
    layer_mean = maps + 1 if relative else 0
    return layer_mean + maps * elements * (3 + (0 if nonneg else 2)) + maps * SFMA_TEST_OPS


def sfma_constant_ops(outputs: int, dropped: int, kk: int, class_taps: int, positions: int) -> int:
    """The dropped maps' constant contribution (docs/ops.md, SFMA): 2 per output channel per tap
    per dropped map (the mean-weighted kernel), 1 add per valid tap per border class per output
    channel, 1 add per output neuron."""
    return 2 * outputs * dropped * kk + outputs * class_taps + outputs * positions


def sfma_saved_ops(outputs: int, positions: int, kk: int, dropped: int) -> int:
    """What dropping ``dropped`` maps saves (docs/ops.md, SFMA): their MACs."""
    return 2 * outputs * positions * kk * dropped
