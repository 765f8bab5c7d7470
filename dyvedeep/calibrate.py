"""Calibrate: choose per-layer knob thresholds that maximise the op reduction while the top-1
loss on the calibration split stays within a budget (absolute percentage points).

The search (a reconstruction of the papers' procedure, see docs/knobs.md):
- layers with an applicable knob and at least ``min_share`` of the dense ops, in decreasing
  order of their op share (greedy); inside a layer the knobs in SEARCH_ORDER (SDSS, SPET, SFMA);
- per knob a small grid of candidate thresholds from quantiles of the statistic it tests,
  observed on calibration images; candidates are tried from the most aggressive down (binary
  search, accuracy being monotone in the threshold), and the most aggressive one is kept whose
  cumulative risk stays within the allowance and which lowers the op count;
- the risk is the acceptance criterion (default ``disagree``: half the share of calibration
  images whose top-1 changes. It ignores the labels: the plain loss of the most aggressive
  candidate that passes is biased low - the search selects candidates that happen to lose few or
  gain many labelled images - and did not transfer to the test split);
- the allowance grows with the op share of the layers done so far, up to ``budget - margin``
  in the first pass; a second pass lets every layer use what is left;
- optionally (``holdout``) part of the calibration images is kept out of the search, and the
  latest accepted changes are undone until the setting also passes on them;
- activations are cached: the tensors live at a layer's input are computed once per layer (under
  the settings accepted so far) and a candidate then runs only from that layer to the output;
  a clearly bad candidate stops after a quarter of the images (early rejection);
- beyond the specification, ``group`` ``shape`` makes the layers of one shape one greedy step,
  each at the same quantile level of its own statistic (fewer trials and fewer choices fitted to
  the calibration images on deep nets of repeated blocks; docs/knobs.md).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import math
import multiprocessing
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from . import _kernels as K
from .datasets import parse_spec
from .engine import ConvGeometry, Engine, cell_corner_max, fc_input_order, packed_cols, sdss_grid, set_blas_threads
from .engine import sfma_spread, spet_channel_order
from .errors import DyveError
from .cli_support import add_data_arguments, load_plan, open_dataset
from .evaluate import topk_correct
from .io_utils import write_text_atomic
from .knobs import DEFAULT_OPTIONS, KNOB_NAMES, KnobConfig, applicable_knobs
from .plan import Layer, Op, Plan

#: Quantiles of each knob's statistic that become candidate thresholds, most aggressive first.
CANDIDATE_QUANTILES = {
    "sfma": (0.6, 0.45, 0.3, 0.2, 0.1, 0.05),
    "sdss": (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3),
    "spet": (0.0, 0.05, 0.1, 0.2, 0.35, 0.5),
}
STAT_IMAGES = 64  # calibration images whose statistics make the candidate grids
EARLY_MIN_IMAGES = 400  # trials on fewer images always run in full
# A candidate that changes the top-1 of more than half of at least this many images while its
# knobs save less than this share of the layer's ops is a harness inconsistency, not a setting.
INCONSISTENT_MIN_IMAGES = 20
INCONSISTENT_SAVED = 1e-3
EARLY_Z = 2.0  # early rejection: the loss on the first quarter exceeds the allowance by this many SEs
TRACE_FIELDS = ("step", "pass", "layer", "knob", "threshold", "options", "calib_top1", "calib_loss_pt", "ops",
                "images", "lost", "gained", "disagree", "risk_pt", "accepted")
#: Order in which a layer's knobs are searched: the ones that save the most ops per changed image
#: on the CIFAR-10 nets first (the order the engine applies them in is fixed: SFMA, SDSS, SPET).
SEARCH_ORDER = ("sdss", "spet", "sfma")
#: Acceptance criteria (see :meth:`Calibrator.risk`).
CRITERIA = ("disagree", "lost", "ucb", "loss")
#: SPET's leading fraction p is a per-layer option; calibration tries these (``--spet-fractions``).
#: 0.25 changes several times more images than 0.5 for the ops it saves, so only 0.5 by default.
SPET_FRACTIONS = (0.5,)
#: SPET's tests calibration tries (``--spet-tests``): ``margin`` (the specification's rule) alone
#: by default; ``bound`` (beyond the reconstruction, docs/knobs.md) searches the scales below.
SPET_TESTS = ("margin",)
#: ``test: bound``'s candidate scales, most aggressive first (1: exact).
SPET_BOUND_SCALES = (0.25, 0.35, 0.5, 0.7, 1.0)


#: How layers form the greedy search's steps (``--group``): each layer alone (the specification's
#: search), or (beyond it) the layers of one shape sharing one quantile level of their own statistics.
GROUPINGS = ("layer", "shape")


def spet_bound(knob: str, options: dict[str, Any]) -> bool:
    """Whether ``knob`` with ``options`` is SPET's ``test: bound``, whose candidates are fixed
    scales rather than quantiles of a statistic."""
    return knob == "spet" and options.get("test") == "bound"


def group_levels(knob: str, options: dict[str, Any]) -> tuple[float, ...]:
    """The levels a shape group's search runs through for ``knob`` with ``options``, most
    aggressive first: SPET ``test: bound``'s scales (the same for every layer), else the
    quantiles of CANDIDATE_QUANTILES (each layer's own threshold at them)."""
    return SPET_BOUND_SCALES if spet_bound(knob, options) else CANDIDATE_QUANTILES[knob]


def level_thresholds(knob: str, values: np.ndarray) -> list[float | None]:
    """One threshold per quantile level of CANDIDATE_QUANTILES (most aggressive first), None where
    the level leaves the knob off (SFMA / SDSS: a quantile of 0); the levels of a shape group."""
    if values.size == 0:
        return [None] * len(CANDIDATE_QUANTILES[knob])
    out: list[float | None] = []
    for q in np.quantile(values.astype(np.float64), CANDIDATE_QUANTILES[knob]):
        if knob == "spet":
            out.append(float(max(q, 0.0)))  # terminate when partial < -t: smaller t is more aggressive
        else:
            t = float(np.nextafter(np.float32(q), np.float32(np.inf)))  # fire when stat < t: include q
            out.append(t if t > 0 else None)
    return out


def shape_key(layer: Layer) -> tuple:
    """What the layers of one ``--group shape`` group share: op, shapes, weight shape, attributes,
    folded ReLU and the knobs that apply."""
    weight = None if layer.weight is None else tuple(layer.weight.shape)
    return (layer.op, tuple(map(tuple, layer.in_shapes)), tuple(layer.out_shape), weight,
            repr(sorted(layer.attrs.items())), layer.relu, layer.input_nonneg, applicable_knobs(layer))


def shape_groups(plan: Plan, rows: list[tuple[str, float]], group: str) -> list[tuple[tuple[str, ...], float]]:
    """The greedy search's steps from ``rows`` ((layer, op share)), largest op share first:
    (layers, their op share); one layer each (``group`` ``layer``), or the layers that share a
    :func:`shape_key`, in plan order (``shape``). Calibration and pruning both use it."""
    if group == "layer":
        return [((name, ), share) for name, share in rows]
    index_of = {layer.name: i for i, layer in enumerate(plan.layers)}
    groups: dict[tuple, list[tuple[str, float]]] = {}
    for name, share in rows:
        groups.setdefault(shape_key(plan.layers[index_of[name]]), []).append((name, share))
    steps = [(tuple(sorted((n for n, _ in members), key=index_of.__getitem__)), sum(s for _, s in members))
             for members in groups.values()]
    return sorted(steps, key=lambda r: -r[1])


def search_key(names: tuple[str, ...], knob: str, options: dict[str, Any]) -> tuple[tuple[str, ...], str, str]:
    """The key of one search: its layers (one, or a shape group), knob and options."""
    return names, knob, repr(sorted(options.items()))


def candidate_thresholds(knob: str, values: np.ndarray) -> list[float]:
    """Distinct thresholds, most aggressive first, from quantiles of the knob's statistic."""
    out: list[float] = []
    for t in level_thresholds(knob, values):
        if t is not None and (not out or not math.isclose(t, out[-1], rel_tol=1e-6, abs_tol=1e-12)):
            out.append(t)
    return out


def live_tensors(plan: Plan, index: int) -> list[str]:
    """Tensors produced before layer ``index`` (or the input) that layers from ``index`` on read."""
    produced = {plan.input_name} | {layer.output for layer in plan.layers[:index]}
    needed: list[str] = []
    for layer in plan.layers[index:]:
        for t in layer.inputs:
            if t in produced and t not in needed:
                needed.append(t)
    return needed


# Worker processes inherit the activation cache of the layer under calibration by fork.
_WORKER_STATE: dict[str, Any] = {}


def _run_chunk(job: tuple[KnobConfig, int, int, int]) -> tuple[np.ndarray, int, int]:
    """In a worker: outputs of images ``lo``..``hi`` of the cache from layer ``index``, their
    ops, and the ops the knobs saved in layer ``index``."""
    config, index, lo, hi = job
    plan, cache = _WORKER_STATE["plan"], _WORKER_STATE["cache"]
    set_blas_threads(1)  # one BLAS thread per worker process
    # compiled runs from layer ``index`` on: the floats and counts of run_image(None, index, ...)
    engine = Engine(plan, config, 1, segment_ends=(index - 1,) if index > 0 else ())
    outputs = np.empty((hi - lo,) + tuple(plan.output_shape), np.float32)
    for n in range(lo, hi):
        outputs[n - lo] = engine.run_from(index, cache[n])[plan.output_name]
    saved = sum(engine.counter.get(plan.layers[index].name, f"saved_{knob}") for knob in KNOB_NAMES)
    return outputs, engine.counter.total("ops"), saved



# ----------------------------------------------------------------------------- knob statistics


def _option(engine: Engine, layer: Layer, knob: str, name: str) -> Any:
    """``knob``'s option ``name`` in ``layer`` under the engine's knobs, else its default."""
    setting = engine.knobs.get(layer.name, knob)
    return setting.option(knob, name) if setting else DEFAULT_OPTIONS[knob][name]


def knob_statistics(engine: Engine, layer: Layer, x: np.ndarray, knob: str) -> np.ndarray:
    """The values that ``knob``'s threshold is compared with in ``layer`` for one input ``x``
    (under the engine's current knobs for the other knobs), for the candidate grids:
    SFMA: each input map's spread; SDSS: each cell's largest grid corner (after ReLU);
    SPET: each neuron's margin -partial where the partial sum is negative."""
    if knob == "sfma":
        geom = ConvGeometry.of(layer)
        statistic = _option(engine, layer, "sfma", "statistic")
        return np.concatenate([sfma_spread(x[g * geom.cin:(g + 1) * geom.cin], layer.input_nonneg, statistic)[0]
                               for g in range(geom.groups)])
    out = engine.run_layer(layer, [x]).reshape(layer.out_shape[0], -1)
    if knob == "sdss":
        ho, wo = layer.out_shape[1], layer.out_shape[2]
        grid = sdss_grid(ho, wo, int(_option(engine, layer, "sdss", "stride")))
        return cell_corner_max(out.reshape(-1, ho, wo), grid)
    if knob == "spet":
        return spet_margins(layer, x, float(_option(engine, layer, "spet", "fraction")))
    raise ValueError(knob)


def spet_margins(layer: Layer, x: np.ndarray, fraction: float) -> np.ndarray:
    """-partial for the neurons of ``layer`` whose partial sum (bias + the leading ``fraction``
    of the inputs in SPET's order) is negative on input ``x``."""
    w = layer.weight
    if layer.op == Op.FC:
        order = fc_input_order(w)
        lead = max(1, math.ceil(fraction * w.shape[1]))
        partial = w[:, order[:lead]] @ x.reshape(-1)[order[:lead]] + layer.bias
    else:
        g = ConvGeometry.of(layer)
        parts = []
        for group in range(g.groups):
            wg = w[group * g.cout:(group + 1) * g.cout]
            order = spet_channel_order(wg)
            lead_ch = order[: max(1, math.ceil(fraction * g.cin))].astype(np.int32) + group * g.cin
            cols = packed_cols(len(lead_ch) * g.kk, g.positions)
            K.im2col_packed(x=x, channels=lead_ch, kh=g.kh, kw=g.kw, sh=g.sh, sw=g.sw, pt=g.pt, pl=g.pl, dh=g.dh,
                            dw=g.dw, ho=g.ho, wo=g.wo, cols=cols, threads=1)
            wl = np.ascontiguousarray(wg[:, lead_ch - group * g.cin].reshape(g.cout, -1))
            part = np.empty((g.cout, g.positions), np.float32)
            K.conv_gemm(W=wl, cols=cols, N=g.positions, out=part, bias=layer.bias[group * g.cout:(group + 1) * g.cout])
            parts.append(part)
        partial = np.concatenate(parts).reshape(-1)
    return -partial[partial < 0]

def greedy_allowances(layers: list[tuple[Any, float]], limit: float, pass_no: int) -> list[tuple[Any, float]]:
    """The greedy search's schedule: each of ``layers`` ((name, share of the ops), largest
    first) with the loss allowed once it is done; in the first pass the ``limit`` (the budget
    less the margin) grows with the share of the ops searched so far, in later passes it is all
    there. Knob calibration and pruning both follow it."""
    total_share = sum(s for _, s in layers) or 1.0
    schedule, done_share = [], 0.0
    for name, share in layers:
        done_share += share
        schedule.append((name, limit * (done_share / total_share if pass_no == 1 else 1.0)))
    return schedule


@dataclass
class Trial:
    """The outcome of one configuration on the calibration images."""

    top1: float
    ops: float
    correct: np.ndarray
    pred: np.ndarray | None = None  # top-1 class per image
    partial: bool = False  # stopped early on the first images (rejected)
    risk_floor: float | None = None  # a partial trial: the lower confidence bound of its risk (pt)
    saved_in_layer: float = 0.0  # ops per image the knobs saved in the layer under calibration


def risk_pt(criterion: str, z: float, dense_correct: np.ndarray, dense_pred: np.ndarray, correct: np.ndarray,
            pred: np.ndarray, changed_weight: float = 1.0) -> tuple[float, int, int, int]:
    """The acceptance statistic of a trial against the dense run (percentage points), and the
    counts of images lost (dense right, now wrong), gained and whose top-1 changed.

    - ``loss``: the top-1 loss, (lost - gained) / n;
    - ``ucb``: an upper confidence bound of the loss: the loss plus ``z`` standard errors of the
      paired per-image difference (each image -1, 0 or +1), so a setting that changes many images
      must show a loss well under the allowance (the noise of a small split is priced in);
    - ``lost``: the share of images lost plus ``z`` standard errors, gains ignored (calibration
      images from the training set gain more often than test images do);
    - ``disagree``: ``changed_weight`` times the share of images whose top-1 changed (with weight
      1 an upper bound of the loss). It does not look at the labels, so the search cannot pick
      candidates that happen to lose few or gain many calibration images."""
    n = max(len(correct), 1)
    lost = int((dense_correct & ~correct).sum())
    gained = int((~dense_correct & correct).sum())
    disagree = int((pred != dense_pred).sum()) if pred is not None else lost + gained
    mean = (lost - gained) / n
    if criterion == "loss":
        value = mean
    elif criterion == "ucb":
        var = max((lost + gained) / n - mean * mean, 0.0)
        value = mean + z * math.sqrt(var / n)
    elif criterion == "lost":
        p = lost / n
        value = p + z * math.sqrt(p * (1 - p) / n)
    elif criterion == "disagree":
        value = changed_weight * disagree / n
    else:
        raise ValueError(criterion)
    return 100.0 * value, lost, gained, disagree


class Calibrator:
    """Greedy threshold search with cached activations."""

    def __init__(self, plan: Plan, images: np.ndarray, labels: np.ndarray, budget: float, margin: float,
                 min_share: float, threads: int, knobs_allowed: tuple[str, ...] = KNOB_NAMES,
                 criterion: str = "disagree", z: float = 1.0, holdout: float = 0.0, seed: int = 0,
                 spet_fractions: tuple[float, ...] = SPET_FRACTIONS, early_reject: bool = True,
                 changed_weight: float = 0.5, spet_tests: tuple[str, ...] = SPET_TESTS,
                 group: str = "layer") -> None:
        if criterion not in CRITERIA:
            raise DyveError(f"--criterion: unknown criterion {criterion!r} (known: {', '.join(CRITERIA)})")
        if group not in GROUPINGS:
            raise DyveError(f"--group: one of {', '.join(GROUPINGS)}, got {group!r}")
        if not 0 <= holdout < 1:
            raise DyveError(f"--holdout: a fraction in [0, 1), got {holdout}")
        self.plan = plan
        labels = np.asarray(labels)
        # the held-out part validates the chosen setting; the search never sees it
        n_hold = int(round(holdout * len(images))) if len(images) > 1 else 0
        order = np.random.default_rng(seed).permutation(len(images)) if n_hold else np.arange(len(images))
        search, hold = np.sort(order[: len(images) - n_hold]), np.sort(order[len(images) - n_hold:])
        self.images, self.labels = images[search], labels[search]
        self.hold_images, self.hold_labels = images[hold], labels[hold]
        self.budget, self.margin, self.min_share = budget, margin, min_share
        self.criterion, self.z = criterion, z
        self.spet_fractions = spet_fractions
        self.spet_tests = spet_tests
        self.early_reject = early_reject
        self.changed_weight = changed_weight
        self.threads = threads
        self.knobs_allowed = knobs_allowed
        self.group = group
        self.kept_levels: dict[tuple[tuple[str, ...], str, str], int] = {}  # accepted level per group and knob
        # per layer (or group), knob and options: the least aggressive threshold (group: level
        # index) whose risk exceeded the whole limit; later passes skip it and all beyond it
        self.hopeless: dict[tuple[tuple[str, ...], str, str], float | int] = {}
        self.config = KnobConfig(model=plan.path.name)
        self.trace: list[dict[str, Any]] = []
        self.history: list[KnobConfig] = []  # the configuration before each accepted change
        self.step = 0
        self.index_of = {layer.name: i for i, layer in enumerate(plan.layers)}
        self.pool = None
        self.pool_cache: list[dict[str, np.ndarray]] | None = None  # the cache the workers were forked with

    # -- running -------------------------------------------------------------------------

    def cache_inputs(self, index: int, config: KnobConfig) -> list[dict[str, np.ndarray]]:
        """Per image, the tensors live at layer ``index``'s input under ``config``."""
        live = live_tensors(self.plan, index)
        if index == 0:
            return [{self.plan.input_name: img} for img in self.images]
        # the compiled runs up to the segment end before ``index``: the floats of run_image(img, stop=index)
        engine = Engine(self.plan, config, self.threads, segment_ends=(index - 1,))
        cache = []
        for img in self.images:
            values = engine.run_range(np.ascontiguousarray(img, dtype=np.float32), 0, index)
            cache.append({t: np.array(values[t], copy=True) for t in live})
        return cache

    def _outputs(self, index: int, cache: list[dict[str, np.ndarray]], config: KnobConfig, lo: int,
                 hi: int) -> tuple[np.ndarray, float, float]:
        """Outputs (flat) of cached images ``lo``..``hi`` from layer ``index``, their total ops and
        the ops the knobs saved in layer ``index``; the images are split over the worker processes."""
        bounds = np.linspace(lo, hi, self.threads + 1).astype(int)
        jobs = [(config, index, int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        _WORKER_STATE.update(plan=self.plan, cache=cache)
        # the workers hold the state of their fork: only a pool forked with this very cache may run it
        if self.pool is not None and self.pool_cache is cache and len(jobs) > 1:
            parts = self.pool.map(_run_chunk, jobs)
        else:
            parts = [_run_chunk(job) for job in jobs]
        return (np.concatenate([p[0] for p in parts]).reshape(hi - lo, -1), float(sum(p[1] for p in parts)),
                float(sum(p[2] for p in parts)))

    def trial(self, index: int, cache: list[dict[str, np.ndarray]], config: KnobConfig,
              prefix_ops: float, labels: np.ndarray | None = None, allowance: float | None = None) -> Trial:
        """Run layers ``index``.. from the cache under ``config``: top-1 and mean ops per image.

        With an ``allowance``, the first quarter of the images is run first, and the trial stops
        there (``partial``) when even a lower confidence bound of the loss on it (EARLY_Z standard
        errors) exceeds the allowance: a clearly bad candidate costs a quarter of a trial."""
        n = len(cache)
        labels = self.labels if labels is None else labels
        first = n // 4 if allowance is not None and n >= EARLY_MIN_IMAGES else n
        outputs, ops, saved = self._outputs(index, cache, config, 0, first)
        if first < n:
            correct, pred = topk_correct(outputs, labels[:first], 1), outputs.argmax(axis=1)
            lower = self.risk_floor(correct, pred)
            if lower > allowance:
                return Trial(float(correct.mean() * 100), prefix_ops + ops / first, correct, pred, partial=True,
                             risk_floor=lower, saved_in_layer=saved / first)
            rest, rest_ops, rest_saved = self._outputs(index, cache, config, first, n)
            outputs, ops, saved = np.concatenate([outputs, rest]), ops + rest_ops, saved + rest_saved
        correct = topk_correct(outputs, labels, 1)
        return Trial(float(correct.mean() * 100), prefix_ops + ops / max(n, 1), correct, outputs.argmax(axis=1),
                     saved_in_layer=saved / max(n, 1))

    def risk_floor(self, correct: np.ndarray, pred: np.ndarray) -> float:
        """A lower confidence bound (EARLY_Z standard errors under) of the risk of a trial on the
        first ``len(correct)`` calibration images: of the share changed (criterion disagree), of
        the share lost (lost), else of the loss (the loss is a lower bound of the share changed)."""
        n = len(correct)
        if self.criterion == "disagree":
            share = float((pred != self.dense.pred[:n]).mean())
            return 100 * self.changed_weight * (share - EARLY_Z * math.sqrt(share * (1 - share) / n))
        return risk_pt("lost" if self.criterion == "lost" else "ucb", -EARLY_Z, self.dense.correct[:n],
                       self.dense.pred[:n], correct, pred)[0]

    def risk(self, trial: Trial, dense: Trial | None = None) -> tuple[float, int, int, int]:
        """The acceptance statistic of ``trial`` (pt) and its lost / gained / changed counts."""
        dense = self.dense if dense is None else dense
        n = len(trial.correct)  # a partial trial covers the first images only
        return risk_pt(self.criterion, self.z, dense.correct[:n], dense.pred[:n], trial.correct, trial.pred,
                       self.changed_weight)

    def prefix_ops(self, index: int, config: KnobConfig) -> float:
        """Mean ops per image of layers before ``index`` under ``config`` (on a sample)."""
        engine = Engine(self.plan, config, self.threads)
        sample = self.images[: min(len(self.images), STAT_IMAGES)]
        for img in sample:
            engine.run_image(img, stop=index)
        return engine.counter.total("ops") / max(len(sample), 1)

    def open_pool(self, cache: list[dict[str, np.ndarray]]) -> None:
        """With ``threads`` > 1, fork the worker processes that run trials on ``cache``: they see
        the plan (its weights included) and ``cache`` as they are now, and only trials on this
        same ``cache`` are sent to them (any other runs in this process)."""
        _WORKER_STATE.update(plan=self.plan, cache=cache)
        self.pool_cache = cache
        if self.threads > 1 and "fork" in multiprocessing.get_all_start_methods():
            # Ctrl-C is the parent's to handle (it terminates the pool): a worker that a SIGINT
            # stopped inside the task queue's lock would leave terminate() waiting on that lock
            self.pool = multiprocessing.get_context("fork").Pool(self.threads, initializer=signal.signal,
                                                                 initargs=(signal.SIGINT, signal.SIG_IGN))

    @contextlib.contextmanager
    def workers(self, cache: list[dict[str, np.ndarray]]) -> Iterator[None]:
        """Worker processes forked for trials on ``cache`` for the time of the block; none
        outlives it, whether it ends, fails or is interrupted (Ctrl-C)."""
        self.open_pool(cache)
        try:
            yield
        except BaseException:
            self.close_pool(terminate=True)
            raise
        finally:
            self.close_pool()

    def close_pool(self, terminate: bool = False) -> None:
        if self.pool is not None:
            if terminate:
                self.pool.terminate()
            else:
                self.pool.close()
            self.pool.join()
            self.pool = None
        self.pool_cache = None

    def trial_forked(self, index: int, cache: list[dict[str, np.ndarray]], config: KnobConfig, prefix_ops: float,
                     labels: np.ndarray | None = None, allowance: float | None = None) -> Trial:
        """:meth:`trial` in worker processes forked for it alone, so that they see the plan as it
        is now: for a caller that changes the network's weights between trials (``dyvedeep
        prune``), and for runs on images other than the cached calibration ones."""
        with self.workers(cache):
            return self.trial(index, cache, config, prefix_ops, labels, allowance)

    def whole_run(self, images: np.ndarray, labels: np.ndarray, config: KnobConfig) -> Trial:
        """Every layer of ``config`` on ``images`` (no cache): for the held-out check."""
        return self.trial_forked(0, [{self.plan.input_name: img} for img in images], config, 0.0, labels)

    # -- search --------------------------------------------------------------------------

    def layers_by_share(self) -> list[tuple[str, float]]:
        """(layer, op share) of the layers worth calibrating, largest share first."""
        total = self.plan.dense_ops
        rows = [(layer.name, layer.dense_ops / total) for layer in self.plan.layers
                if any(k in self.knobs_allowed for k in applicable_knobs(layer))
                and layer.dense_ops / total >= self.min_share]
        return sorted(rows, key=lambda r: -r[1])

    def layer_groups(self) -> list[tuple[tuple[str, ...], float]]:
        """The greedy search's steps (:func:`shape_groups` of the layers worth calibrating)."""
        return shape_groups(self.plan, self.layers_by_share(), self.group)

    def run_dense(self) -> Trial:
        """Run the network without knobs on the calibration images (not the held-out ones): the
        reference every trial's risk is measured against (``dense``, also ``current``)."""
        set_blas_threads(self.threads)
        dense_engine = Engine(self.plan, None, self.threads)
        outputs = np.stack([dense_engine.run_image(img)[self.plan.output_name] for img in self.images])
        outputs = outputs.reshape(len(self.images), -1)
        self.dense_correct = topk_correct(outputs, self.labels, 1)
        self.dense_top1 = float(self.dense_correct.mean() * 100)
        self.dense_ops = self.plan.dense_ops
        self.dense = Trial(self.dense_top1, float(self.dense_ops), self.dense_correct, outputs.argmax(axis=1))
        self.current = self.dense
        return self.dense

    def run(self, passes: int = 2) -> KnobConfig:
        """The greedy search, then the held-out check; returns the chosen knob configuration."""
        start = time.monotonic()
        self.run_dense()
        crit = self.criterion + (f" (z {self.z:g})" if self.criterion == "ucb" else "")
        held = f", {len(self.hold_images)} held out" if len(self.hold_images) else ""
        self.log(f"dense top-1 on {len(self.images)} calibration images{held}: {self.dense_top1:.2f} %; "
                 f"budget {self.budget} pt, margin {self.margin} pt, criterion {crit}")
        steps, limit = self.layer_groups(), self.budget - self.margin
        for pass_no in range(1, passes + 1):
            for names, allowance in greedy_allowances(steps, limit, pass_no):
                if len(names) == 1:
                    self.calibrate_layer(names[0], allowance, pass_no)
                else:
                    self.calibrate_group(names, allowance, pass_no)
            self.log(f"pass {pass_no} done: calib top-1 {self.current.top1:.2f} % "
                     f"(loss {self.dense_top1 - self.current.top1:.2f} pt, {self.criterion} "
                     f"{self.risk(self.current)[0]:.2f} pt), ops {self.dense_ops / self.current.ops:.2f}x "
                     f"fewer, {time.monotonic() - start:.0f} s")
        if len(self.hold_images):
            self.check_holdout(limit)
            self.log(f"held-out check done, {time.monotonic() - start:.0f} s")
        return self.config

    def check_holdout(self, limit: float) -> None:
        """Back off until the setting stays within ``limit`` on the held-out images: the latest
        accepted changes are undone first (binary search over the accepted history)."""
        configs = self.history[1:] + [self.config]  # history[0] is the dense setting
        dense = self.whole_run(self.hold_images, self.hold_labels, KnobConfig())
        best = self.holdout_back_off(len(configs), lambda i: self.whole_run(self.hold_images, self.hold_labels,
                                                                            configs[i]), dense, limit)
        if best == len(configs) - 1:
            return
        self.config = configs[best].copy() if best >= 0 else KnobConfig(model=self.plan.path.name)
        self.backed_off = len(configs) - 1 - best
        self.current = None  # the calibration numbers of the kept setting are no longer tracked

    def holdout_back_off(self, settings: int, run_setting: Callable[[int], Trial], dense: Trial,
                         limit: float) -> int:
        """The last of ``settings`` accepted settings, in the order accepted (each one change more
        than the one before, so the risk grows along them), that stays within ``limit`` on the
        held-out images, -1 when none does. ``run_setting(i)`` runs setting ``i`` on the held-out
        images, ``dense`` is the dense run on them. The last setting is checked first, then a
        binary search undoes the latest changes."""
        self.hold_dense = dense
        verdicts: dict[int, bool] = {}

        def passes(i: int) -> bool:
            if i not in verdicts:
                trial = run_setting(i)
                risk, lost, gained, _ = self.risk(trial, dense)
                verdicts[i] = risk <= limit + 1e-9
                self.log(f"held-out check of setting {i + 1}/{settings}: top-1 {trial.top1:.2f} % "
                         f"(dense {dense.top1:.2f} %, {lost} lost, {gained} gained, {self.criterion} {risk:.2f} pt) "
                         f"-> {'kept' if verdicts[i] else 'backed off'}")
            return verdicts[i]

        if settings == 0 or passes(settings - 1):
            return settings - 1
        lo, hi, best = 0, settings - 2, -1  # largest i that passes
        while lo <= hi:
            mid = (lo + hi) // 2
            if passes(mid):
                best, lo = mid, mid + 1
            else:
                hi = mid - 1
        return best

    def calibrate_layer(self, name: str, allowance: float, pass_no: int) -> None:
        """Try each applicable knob of one layer; keep the most aggressive acceptable threshold."""
        index = self.index_of[name]
        layer = self.plan.layers[index]
        cache = self.cache_inputs(index, self.config)
        prefix = self.prefix_ops(index, self.config)
        with self.workers(cache):
            self._calibrate_knobs(name, layer, index, cache, prefix, allowance, pass_no)

    def _calibrate_knobs(self, name: str, layer, index: int, cache, prefix: float, allowance: float,
                         pass_no: int) -> None:
        for knob in sorted(applicable_knobs(layer), key=SEARCH_ORDER.index):
            if knob not in self.knobs_allowed:
                continue
            current = self.config.get(name, knob)
            for options in self.options_grid(knob):
                candidates = self.candidates(layer, knob, cache, options)
                if current is not None and current.options == options:
                    # a later pass only tries more aggressive settings of the same options
                    candidates = [t for t in candidates if self._more_aggressive(knob, t, current.threshold)]
                hopeless = self.hopeless.get(search_key((name,), knob, options))
                if hopeless is not None:
                    candidates = [t for t in candidates if self._more_aggressive(knob, hopeless, t)]
                if not candidates:
                    continue
                best = self.search(name, knob, candidates, options, cache, index, prefix, allowance, pass_no)
                if best is not None:
                    self.history.append(self.config.copy())
                    self.config.set(name, knob, best[0], **options)
                    self.current = best[1]
                    current = self.config.get(name, knob)

    def calibrate_group(self, names: tuple[str, ...], allowance: float, pass_no: int) -> None:
        """One greedy step over a shape group: per knob, the most aggressive quantile level of
        each layer's own statistic (the same level for all) that is accepted; a later pass only
        tries levels more aggressive than the one kept."""
        index = self.index_of[names[0]]
        searches = [(knob, options) for knob in SEARCH_ORDER
                    if knob in self.knobs_allowed and knob in applicable_knobs(self.plan.layers[index])
                    for options in self.options_grid(knob) if self.group_level_range(names, knob, options)]
        if not searches:  # every level was kept or is beyond the limit: no cache to build
            return
        cache = self.cache_inputs(index, self.config)
        prefix = self.prefix_ops(index, self.config)
        with self.workers(cache):
            for knob, options in searches:
                self._search_group(names, knob, options, index, cache, prefix, allowance, pass_no)

    def group_level_range(self, names: tuple[str, ...], knob: str, options: dict[str, Any]) -> range:
        """The indices of the levels a group's search may still try for ``knob`` with ``options``:
        none as aggressive as one beyond the limit in an earlier pass, only more aggressive ones
        than the level kept."""
        key = search_key(names, knob, options)
        levels = group_levels(knob, options)
        return range(self.hopeless.get(key, -1) + 1, min(len(levels), self.kept_levels.get(key, len(levels))))

    def group_level_thresholds(self, names: tuple[str, ...], knob: str, options: dict[str, Any], index: int,
                               cache: list[dict[str, np.ndarray]]) -> dict[str, list[float | None]]:
        """Per layer of a group, its thresholds at each quantile level, from its own inputs on a
        sample of the cached images (run from the group's first layer, the knob off there)."""
        out = {}
        for name in names:
            layer = self.plan.layers[self.index_of[name]]
            if spet_bound(knob, options):
                out[name] = list(SPET_BOUND_SCALES)
                continue
            probe = self.config.copy()
            probe.disable(name, knob)
            if knob == "spet":
                probe.set(name, "spet", math.inf, **options)
            engine = Engine(self.plan, probe, 1)
            at = self.index_of[name]
            values = []
            for tensors in cache[:STAT_IMAGES]:
                inputs = tensors if at == index else engine.run_image(None, start=index, tensors=tensors, stop=at)
                values.append(knob_statistics(engine, layer, inputs[layer.inputs[0]], knob))
            out[name] = level_thresholds(knob, np.concatenate(values) if values else np.zeros(0))
        return out

    def _search_group(self, names: tuple[str, ...], knob: str, options: dict[str, Any], index: int, cache,
                      prefix: float, allowance: float, pass_no: int) -> None:
        """Binary search over the quantile levels of one knob and option setting in a group."""
        thresholds = self.group_level_thresholds(names, knob, options, index, cache)
        key = search_key(names, knob, options)
        levels = group_levels(knob, options)
        tried = self.group_level_range(names, knob, options)
        lo, hi = tried.start, tried.stop - 1
        best: tuple[int, KnobConfig, Trial] | None = None
        label = f"{names[0]}..{names[-1]} ({len(names)} layers)"
        while lo <= hi:
            mid = (lo + hi) // 2
            config = self.config.copy()
            for name in names:
                t = thresholds[name][mid]
                if t is not None:
                    config.set(name, knob, t, **options)
            trial = self.trial(index, cache, config, prefix, allowance=allowance if self.early_reject else None)
            risk = self.risk(trial)
            if config.get(names[0], knob) is not None:
                self.check_consistent(names[0], knob, thresholds[names[0]][mid] or 0.0, trial, risk[3])
            ok = not trial.partial and risk[0] <= allowance + 1e-9 and trial.ops < self.current.ops
            if self.beyond_limit(trial):
                self.hopeless[key] = max(self.hopeless.get(key, -1), mid)
            first = thresholds[names[0]][mid]
            self.record(pass_no, label, knob, math.nan if first is None else first,
                        {**options, "level": levels[mid]}, trial, ok, risk)
            if ok:
                best, hi = (mid, config, trial), mid - 1
            else:
                lo = mid + 1
        if best is not None:
            self.history.append(self.config.copy())
            self.kept_levels[key] = best[0]
            self.config, self.current = best[1], best[2]

    def options_grid(self, knob: str) -> list[dict[str, Any]]:
        """The option settings searched for ``knob``: SPET's fractions, per test (the margin rule
        written without its default, so that knob files keep the specification's form)."""
        if knob != "spet":
            return [{}]
        return [{"fraction": f, **({} if test == "margin" else {"test": test})}
                for test in self.spet_tests for f in self.spet_fractions]

    @staticmethod
    def _more_aggressive(knob: str, t: float, than: float) -> bool:
        return t < than if knob == "spet" else t > than

    def candidates(self, layer, knob: str, cache: list[dict[str, np.ndarray]],
                   options: dict[str, Any]) -> list[float]:
        """Candidate thresholds from the knob's statistic on a sample of cached inputs (SPET's
        bound: its fixed scales)."""
        if spet_bound(knob, options):
            return list(SPET_BOUND_SCALES)
        probe = self.config.copy()
        probe.disable(layer.name, knob)
        if knob == "spet":  # the statistic depends on the fraction: let the probe know it
            probe.set(layer.name, "spet", math.inf, **options)
        engine = Engine(self.plan, probe, 1)
        values = [knob_statistics(engine, layer, tensors[layer.inputs[0]], knob)
                  for tensors in cache[:STAT_IMAGES]]
        return candidate_thresholds(knob, np.concatenate(values) if values else np.zeros(0))

    def search(self, name: str, knob: str, candidates: list[float], options: dict[str, Any], cache,
               index: int, prefix: float, allowance: float, pass_no: int) -> tuple[float, Trial] | None:
        """Binary search for the most aggressive acceptable candidate (list is most aggressive first)."""
        lo, hi = 0, len(candidates) - 1
        best: tuple[float, Trial] | None = None
        tried: dict[int, bool] = {}
        while lo <= hi:
            mid = (lo + hi) // 2
            t = candidates[mid]
            config = self.config.copy()
            config.set(name, knob, t, **options)
            trial = self.trial(index, cache, config, prefix, allowance=allowance if self.early_reject else None)
            risk = self.risk(trial)
            self.check_consistent(name, knob, t, trial, risk[3])
            ok = not trial.partial and risk[0] <= allowance + 1e-9 and trial.ops < self.current.ops
            tried[mid] = ok
            if self.beyond_limit(trial):
                key = search_key((name,), knob, options)
                if key not in self.hopeless or self._more_aggressive(knob, self.hopeless[key], t):
                    self.hopeless[key] = t
            self.record(pass_no, name, knob, t, options, trial, ok, risk)
            if ok:
                best = (t, trial)
                hi = mid - 1
            else:
                lo = mid + 1
        return best

    def beyond_limit(self, trial: Trial) -> bool:
        """Whether a trial's risk exceeds the whole limit, ``budget - margin``, even at its lower
        confidence bound (:meth:`risk_floor`): knobs accepted later only add to a setting, which
        rarely lowers its risk, so later passes do not try it or anything more aggressive again."""
        floor = trial.risk_floor if trial.partial else self.risk_floor(trial.correct, trial.pred)
        return floor > self.budget - self.margin + 1e-9

    def check_consistent(self, name: str, knob: str, t: float, trial: Trial, changed: int) -> None:
        """Stop with an error when a candidate changes the top-1 of most images while its knob
        barely fires: the runs from cached activations then do not reproduce the network (a
        harness bug, which would otherwise reject every candidate of the layer silently)."""
        n = len(trial.correct)
        layer_ops = self.plan.layers[self.index_of[name]].dense_ops
        if n >= INCONSISTENT_MIN_IMAGES and changed > n / 2 and trial.saved_in_layer < INCONSISTENT_SAVED * layer_ops:
            raise DyveError(f"{self.plan.path}: calibrating {name} {knob} at {t:.4g}: the top-1 of {changed} of {n} "
                            f"images changed while the knob saved {trial.saved_in_layer:.4g} of the layer's "
                            f"{layer_ops} ops per image; the runs from cached activations do not reproduce "
                            f"the network (a bug of the harness)")

    # -- reporting -----------------------------------------------------------------------

    def record(self, pass_no: int, name: str, knob: str, t: float, options: dict[str, Any], trial: Trial,
               ok: bool, risk: tuple[float, int, int, int]) -> None:
        self.step += 1
        n = len(trial.correct)  # a partial trial: compared with the dense run on the same images
        loss = float(self.dense.correct[:n].mean() * 100) - trial.top1
        value, lost, gained, disagree = risk
        self.trace.append({"step": self.step, "pass": pass_no, "layer": name, "knob": knob, "threshold": t,
                           "options": " ".join(f"{k}={v}" for k, v in options.items()),
                           "calib_top1": round(trial.top1, 4), "calib_loss_pt": round(loss, 4),
                           "ops": round(trial.ops, 1), "images": n, "lost": lost, "gained": gained, "disagree": disagree,
                           "risk_pt": round(value, 4), "accepted": int(ok)})
        opts = "".join(f" {k}={v}" for k, v in options.items())
        early = f" (stopped after {len(trial.correct)} images)" if trial.partial else ""
        self.log(f"[{self.step}] pass {pass_no} {name} {knob}{opts} t={t:.4g}: top-1 {trial.top1:.2f} %{early} "
                 f"(loss {loss:+.2f} pt, {lost} lost, {gained} gained, {self.criterion} {value:.2f} pt), "
                 f"ops {self.dense_ops / trial.ops:.2f}x fewer -> {'candidate' if ok else 'rejected'}")

    @staticmethod
    def log(message: str) -> None:
        print(f"calibrate: {message}", file=sys.stderr, flush=True)

    def trace_csv(self) -> str:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=TRACE_FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerow({"step": 0, "pass": 0, "layer": "", "knob": "dense", "threshold": "", "options": "",
                         "calib_top1": round(self.dense_top1, 4), "calib_loss_pt": 0.0,
                         "ops": float(self.dense_ops), "images": len(self.images), "lost": 0, "gained": 0, "disagree": 0, "risk_pt": 0.0,
                         "accepted": 1})
        writer.writerows(self.trace)
        return buf.getvalue()


def cmd_calibrate(args: argparse.Namespace) -> int:
    plan = load_plan(args.model)
    if parse_spec(args.data)[2] == "test":
        raise DyveError(f"{args.data}: calibration never uses the test split; use the calib split")
    dataset = open_dataset(plan, args.data, args.limit, args.mirror, args.mix)
    if len(dataset) == 0:
        raise DyveError(f"{args.data}: no calibration images")
    images = dataset.images(0, len(dataset))
    knobs = tuple(k for k in args.knobs.split(",") if k) if args.knobs else KNOB_NAMES
    for k in knobs:
        if k not in KNOB_NAMES:
            raise DyveError(f"--knobs: unknown knob {k!r} (known: {', '.join(KNOB_NAMES)})")
    try:
        spet_fractions = tuple(float(f) for f in args.spet_fractions.split(",") if f)
    except ValueError:
        raise DyveError(f"--spet-fractions: comma-separated numbers, got {args.spet_fractions!r}") from None
    if not spet_fractions or not all(0 < f <= 1 for f in spet_fractions):
        raise DyveError(f"--spet-fractions: fractions in (0, 1], got {args.spet_fractions!r}")
    spet_tests = tuple(t for t in args.spet_tests.split(",") if t)
    if not spet_tests or not set(spet_tests) <= {"margin", "bound"}:
        raise DyveError(f"--spet-tests: comma-separated margin, bound; got {args.spet_tests!r}")
    cal = Calibrator(plan, images, np.asarray(dataset.labels), args.budget, args.margin, args.min_share,
                     args.threads, knobs, criterion=args.criterion, z=args.z, holdout=args.holdout,
                     spet_fractions=spet_fractions, changed_weight=args.changed_weight, spet_tests=spet_tests,
                     group=args.group)
    config = cal.run(passes=args.passes)
    config.save(args.output)
    if args.trace:
        write_text_atomic(args.trace, cal.trace_csv())
    if cal.current is not None:
        print(f"calibration top-1 {cal.current.top1:.2f} % (dense {cal.dense_top1:.2f} %), "
              f"ops {cal.dense_ops / cal.current.ops:.2f}x fewer; knobs written to {args.output}")
    else:
        print(f"held-out check: {cal.backed_off} accepted change(s) undone; knobs written to {args.output}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``calibrate``."""
    p = subparsers.add_parser("calibrate", help="choose knob thresholds under an accuracy budget")
    p.add_argument("model", type=Path, metavar="MODEL.onnx")
    add_data_arguments(p, calibration=True)
    p.add_argument("--budget", type=float, default=0.5, help="top-1 loss budget, percentage points (default 0.5)")
    p.add_argument("--margin", type=float, default=0.0,
                   help="kept in reserve from the budget (default 0 pt: the criterion keeps its own reserve)")
    p.add_argument("--min-share", type=float, default=0.01, help="skip layers under this share of dense ops")
    p.add_argument("--passes", type=int, default=2)
    p.add_argument("--criterion", choices=CRITERIA, default="disagree",
                   help="acceptance statistic: disagree (--changed-weight x share of images whose top-1 changed), "
                        "lost (share lost + z standard errors), ucb (loss + z standard errors), loss "
                        "(default disagree)")
    p.add_argument("--z", type=float, default=1.0, help="standard errors added by lost and ucb (default 1)")
    p.add_argument("--changed-weight", type=float, default=0.5,
                   help="criterion disagree: points of loss counted per point of images changed (default 0.5)")
    p.add_argument("--group", choices=GROUPINGS, default="layer",
                   help="steps of the greedy search: each layer alone (default), or shape (beyond the "
                        "specification): the layers of one shape together, each at the same quantile level "
                        "of its own statistic (deep nets of repeated blocks: fewer trials, fewer choices "
                        "fitted to the calibration images)")
    p.add_argument("--holdout", type=float, default=0.0,
                   help="fraction of the calibration images held out to check the chosen setting (default 0)")
    p.add_argument("--spet-fractions", default=",".join(map(str, SPET_FRACTIONS)),
                   help="SPET leading fractions tried, most aggressive first (default %(default)s)")
    p.add_argument("--spet-tests", default=",".join(SPET_TESTS),
                   help="SPET tests tried: margin (the specification's rule), bound (beyond the reconstruction: "
                        "the partial sum against a scaled bound of the rest, docs/knobs.md) (default %(default)s)")
    p.add_argument("--knobs", default="", help="comma-separated subset of sfma,sdss,spet (default all)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("-o", "--output", type=Path, required=True, metavar="KNOBS.yaml")
    p.add_argument("--trace", type=Path, default=None, metavar="TRACE.csv")
    p.set_defaults(func=cmd_calibrate)
