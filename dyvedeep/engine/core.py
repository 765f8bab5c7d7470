"""The engine: runs a :class:`~dyvedeep.plan.Plan` one image at a time on the Cython kernels,
each layer on its knob-free path or, in the conv and fully-connected layers with knobs on, on
the knob path; counts scalar operations exactly in one :class:`OpCounter`. Whenever no knob
fired in a layer for an image, the layer's result is the knob-free path's, bit for bit.

Layers dispatch through one table (op -> runner); the runs of consecutive knob-free layers are
compiled into programs (:class:`CompiledRun`) that run in one parallel region per image.
"""
from __future__ import annotations

import time

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
from threadpoolctl import ThreadpoolController

from .. import _kernels as K
from ..errors import DyveError
from ..knobs import KnobConfig
from ..plan import Layer, Op, Plan
from . import plain
from .bands import ConvPoolBands, plan_conv_pool_bands
from .conv_plan import ConvPlan, plan_conv
from .counting import OpCounter, conv_band_macs, fallback_costs
from .knob_path import conv_group_with_knobs
from .memory import Scratch, aligned_zeros, plan_buffers, tensor_readers
from .sfma_alone import sfma_alone_compilable, sfma_alone_steps, sfma_alone_totals
from .spet import FcPlan, fc_spet, plan_fc
from .tuning import DEFAULT_TUNING, EngineTuning


@dataclass
class CompiledRun:
    """Consecutive layers of the knob-free path compiled into one K.Program: their kernels run
    in one parallel region per image (Engine.run), not one per kernel called from Python."""

    program: K.Program
    layers: list[int]  # the layer indices it runs
    views: dict[str, np.ndarray]  # the tensors it produces, as views of the engine's buffers
    banded: list[int] = field(default_factory=list)  # its conv layers run band by band
    # (layer index, first step, one past its last step) in the program, per layer or banded pair
    # (under the conv's index): which steps Program.step_seconds gives for which layer
    step_ranges: list[tuple[int, int, int]] = field(default_factory=list)


_BLAS = {"controller": None, "threads": None}


def set_blas_threads(threads: int) -> None:
    """Limit the BLAS libraries to ``threads`` threads for the process (only when it changes:
    looking the libraries up costs far more than a small network's batch-1 run)."""
    if _BLAS["threads"] == threads:
        return
    if _BLAS["controller"] is None:
        _BLAS["controller"] = ThreadpoolController()
    _BLAS["controller"].limit(limits=threads, user_api="blas")
    _BLAS["threads"] = threads


def layer_work(layer: Layer) -> int:
    """A layer's work for the choice of its threads (EngineTuning.parallel_min_work): its MACs,
    or 8 per element of its output or of its largest input."""
    elements = [int(np.prod(shape)) for shape in [layer.out_shape, *layer.in_shapes]]
    return max(layer.dense_macs, 8 * max(elements))


def batch_and_outputs(plan: Plan, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A batch of preprocessed inputs (N, C, H, W) checked against the plan's input shape, as
    C-contiguous float32, and the (N, ...) array its outputs go to."""
    batch = np.ascontiguousarray(batch, dtype=np.float32)
    if batch.ndim != 4 or tuple(batch.shape[1:]) != tuple(plan.input_shape):
        raise DyveError(f"{plan.path}: input shape {tuple(batch.shape)} does not match the model's "
                        f"(N, {', '.join(map(str, plan.input_shape))})")
    return batch, np.empty((batch.shape[0],) + tuple(plan.output_shape), np.float32)


class Engine:
    """Runs a plan on batches of images; ``knobs=None`` (or an empty config) is the dense network.

    Every layer writes into an output buffer allocated once per engine (no allocation, hence no
    page faults, per image); a Concat's inputs are written in place into their slices of its
    buffer. :meth:`forward` returns views of these buffers (valid until the next call);
    :meth:`run` and :meth:`run_image` return copies.

    With ``compiled`` (the default), the runs of consecutive layers that take the knob-free path
    (convolutions without knobs, poolings, in-place concatenations, views) are compiled into
    programs (CompiledRun): :meth:`run` then runs each in one parallel region per image, the same
    kernels with the same shares, hence the same floats. ``tuning`` sets the speed choices.

    ``segment_ends`` (layer indices) split the compiled runs after those layers, whose outputs
    are then made whole: :meth:`run_range` runs one segment at a time through the compiled runs
    (for a caller that looks at a segment's output before it goes on, e.g. a decision gate)."""

    def __init__(self, plan: Plan, knobs: KnobConfig | None = None, threads: int = 1, compiled: bool = True,
                 tuning: EngineTuning = DEFAULT_TUNING, segment_ends: Sequence[int] = ()) -> None:
        if threads < 1:
            raise DyveError(f"threads must be >= 1, got {threads}")
        if knobs is not None and knobs.gates is not None:
            raise DyveError(f"{knobs.gates.knob_file or plan.path}: the knob file has decision gates; "
                            "run it with dyvedeep.gates.GatedEngine")
        self.plan = plan
        self.knobs = knobs if knobs is not None else KnobConfig()
        self.segment_ends = frozenset(int(i) for i in segment_ends)
        if any(not 0 <= i < len(plan.layers) for i in self.segment_ends):
            raise DyveError(f"{plan.path}: segment ends {sorted(self.segment_ends)} must be layer indices "
                            f"0..{len(plan.layers) - 1}")
        self.threads = int(threads)
        self.tuning = tuning
        self.counter = OpCounter.for_plan(plan)
        self.layer_threads = {layer.name: self.threads if layer_work(layer) >= tuning.parallel_min_work else 1
                              for layer in plan.layers}
        self.kernel_threads = 1  # threads of the current layer's own kernels (Python path)
        # The Python path's layers (knobs, fully connected) each open a parallel region: on a
        # busy machine each waits for a descheduled thread. As a compiled run does (K.Program),
        # a whole image's Python path takes one thread or all of them, by their recent times.
        self.python_path_choice = K.ThreadChoice()
        self.python_path_one_thread = False
        self.layer_plans: dict[str, ConvPlan | FcPlan] = {}  # conv and fully-connected layers
        for layer in plan.layers:
            if layer.op == Op.CONV:
                self.layer_plans[layer.name] = plan_conv(layer, self.knobs, tuning, self.threads)
            elif layer.op == Op.FC:
                self.layer_plans[layer.name] = plan_fc(layer, self.knobs)
        convs = [st for st in self.layer_plans.values() if isinstance(st, ConvPlan)]
        cols = aligned_zeros(max([cp.cols.size for cp in convs], default=0))
        for cp in convs:
            cp.cols = cols[:cp.cols.size].reshape(cp.cols.shape)
        self.buffers, self.in_place = plan_buffers(plan)
        readers = tensor_readers(plan)
        self.conv_pool_bands: dict[int, ConvPoolBands] = {}  # conv layer index -> its bands
        for i, layer in enumerate(plan.layers):
            if layer.op == Op.CONV and layer.output not in self.in_place:
                bands = plan_conv_pool_bands(plan, i, self.layer_plans[layer.name], readers, tuning)
                if bands is not None:
                    self.conv_pool_bands[i] = bands
                    geom = self.layer_plans[layer.name].geom
                    self.counter.set_banded(i, conv_band_macs([b.rows for b in bands.bands], geom.wo, geom.cout,
                                                              geom.cin * geom.kk))
        geoms = [cp.geom for cp in convs]
        self.scratch = Scratch(
            cols=cols,
            source=aligned_zeros(max([cp.source_floats for cp in convs], default=1)),
            panels=aligned_zeros((self.threads, max([g.cin * g.kk * 32 for g in geoms], default=32))),
            kept_weights=aligned_zeros(max([g.cout * g.cin * g.kk for g in geoms], default=1)),
            constant=aligned_zeros(max([g.cout * g.positions for g in geoms], default=1)),
            bands=aligned_zeros(max([b.band_floats for b in self.conv_pool_bands.values()], default=1)))
        self._steps = [(i, layer, layer.inputs, self.buffers.get(layer.output)) for i, layer in enumerate(plan.layers)]
        self._image = aligned_zeros(plan.input_shape)  # stands for the image in the compiled runs
        self.c_counted: set[int] = set()  # compiled layers that count their own runs (SFMA alone)
        self.compiled_runs = self._compile_runs() if compiled else None
        # whether a whole image has layers with threads of their own on the Python path
        self.has_python_path = self.compiled_runs is not None and any(
            isinstance(part, int) and self.layer_threads[self.plan.layers[part].name] > 1 for part in self.compiled_runs)
        # the first part (of compiled_runs) of each segment, by the segment's first layer
        self._part_at: dict[int, int] = {}
        if self.compiled_runs is not None:
            for p, part in enumerate(self.compiled_runs):
                first = part.layers[0] if isinstance(part, CompiledRun) else part
                if first == 0 or first - 1 in self.segment_ends:
                    self._part_at[first] = p
        self._part_at[len(plan.layers)] = len(self.compiled_runs or ())
        self._ranges: dict[tuple[int, int], list] = {}  # (start, stop) -> its steps (run_range)
        self._producers: dict[str, Layer] | None = None  # tensor -> the layer that makes it (run_from)
        self._range_values: dict[str, np.ndarray] = {}
        self._judge_python_path, self._image_one_thread, self._python_path_seconds = False, False, 0.0

    # -- public API ------------------------------------------------------------------------

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Outputs (N, ...) of a batch of preprocessed inputs (N, C, H, W)."""
        batch, outputs = batch_and_outputs(self.plan, batch)
        set_blas_threads(self.threads)
        for n in range(batch.shape[0]):
            outputs[n] = self.forward(batch[n], banded=True)[self.plan.output_name]
        return outputs

    def last_image_took_one_thread(self) -> bool:
        """Whether the last image ran (in part) on one thread in an engine of several: a
        compiled program's ThreadChoice, or the Python path's, took one thread for it."""
        programs = [part.program for part in self.compiled_runs or () if isinstance(part, CompiledRun)]
        return self.threads > 1 and (self._image_one_thread
                                     or any(len(p) and p.last_one_thread for p in programs))

    def run_image(self, image: np.ndarray, start: int = 0, tensors: dict[str, np.ndarray] | None = None,
                  stop: int | None = None) -> dict[str, np.ndarray]:
        """Run layers ``start``..``stop`` on one image; returns copies of the tensors still live
        after it: those that later layers read, and the graph output once made.

        ``tensors`` supplies the inputs of the first layer run (for cached activations)."""
        values = self.forward(image, start, tensors, stop)
        later = self.plan.layers[stop:] if stop is not None else []
        live = {t for layer in later for t in layer.inputs} | {self.plan.output_name}
        return {name: np.array(v, copy=True) for name, v in values.items() if name in live}

    def forward(self, image: np.ndarray | None, start: int = 0, tensors: dict[str, np.ndarray] | None = None,
                stop: int | None = None, banded: bool = False) -> dict[str, np.ndarray]:
        """As :meth:`run_image`, but returns every tensor produced as a view of the engine's
        buffers: a dead tensor's buffer may already hold a later tensor, and the next call
        overwrites them all. With ``banded``, a conv and the max-pooling that alone reads it run
        band by band (ConvPoolBands): the same floats, but the conv's own output is not returned;
        a whole image then runs through the compiled runs."""
        if (banded and self.compiled_runs is not None and image is not None and start == 0 and stop is None
                and not tensors):
            return self.run_range(np.ascontiguousarray(image, dtype=np.float32))
        values: dict[str, np.ndarray] = dict(tensors) if tensors else {}
        for name in values.keys() & self.in_place:
            # a Concat reads these from its own buffer, where their producer would have written them
            buffer, given = self.buffers[name], values[name]
            if given.ctypes.data != buffer.ctypes.data or given.size != buffer.size:
                np.copyto(buffer, np.array(given, copy=True).reshape(buffer.shape))
            values[name] = buffer
        if image is not None:
            values[self.plan.input_name] = image
        steps = self._steps[start:stop]
        last = steps[-1][0] if steps else -1
        skip = -1
        for i, layer, inputs, out in steps:
            if i == skip:
                continue
            if banded and i in self.conv_pool_bands and i + 1 <= last and i not in self.segment_ends:
                pool = self.plan.layers[i + 1]
                values[pool.output] = self._run_conv_pool_bands(self.conv_pool_bands[i], values[inputs[0]])
                skip = i + 1
                continue
            values[layer.output] = self.run_layer(layer, [values[t] for t in inputs], out, i)
        return values

    def run_layer(self, layer: Layer, inputs: list[np.ndarray], out: np.ndarray | None = None,
                  index: int | None = None) -> np.ndarray:
        """One layer (the ``index``-th of the plan) on ``inputs`` into ``out`` (allocated when
        None) under the engine's knobs; counts its ops. Returns its output."""
        if index is None:
            index = self.counter.index[layer.name]
        if out is None and layer.op != Op.ALIAS:
            out = np.empty(layer.out_shape, np.float32)
        self.kernel_threads = 1 if self.python_path_one_thread else self.layer_threads[layer.name]
        runner = RUNNERS.get(layer.op)
        if runner is None:
            raise DyveError(f"{self.plan.path}: layer {layer.name}: op {layer.op} is not supported by the engine")
        if not layer.is_compute:  # conv and fully-connected layers count themselves (knobs)
            self.counter.plain_runs[index] += 1
        return runner(self, layer, inputs, out, index)

    def run_range(self, image: np.ndarray | None, start: int = 0, stop: int | None = None) -> dict[str, np.ndarray]:
        """Run layers ``start``..``stop`` (exclusive; None: to the end) of one image through the
        compiled runs and, between them, the layers on the Python path: the floats and ops of
        ``forward(image, banded=True)``. ``start`` and ``stop`` are 0, the end, or one past a
        segment end (``segment_ends``); a range that does not start at 0 continues the image of
        the last call (``image`` is then unused). Returns the tensors made so far for this image
        as views of the engine's buffers (valid until the next call; a dead tensor's buffer may
        already hold a later one)."""
        stop = len(self.plan.layers) if stop is None else stop
        steps = self._ranges.get((start, stop))
        if steps is None:
            steps = self._range_steps(start, stop)
        if start == 0:
            if image is None or image.dtype != np.float32 or not image.flags.c_contiguous:
                raise DyveError(f"{self.plan.path}: run_range from layer 0 needs the image, C-contiguous float32")
            values = self._range_values = {self.plan.input_name: image}
        else:
            values = self._range_values
            if not values:
                raise DyveError(f"{self.plan.path}: run_range({start}, ...) continues an image that no range started")
            image = values[self.plan.input_name]
        runs, band_runs = self.counter.plain_runs, self.counter.band_runs
        if start == 0:
            # the Python path takes one thread or all for a whole image (python_path_choice),
            # judged by the image's time on it; an image that stops early (a gate) is not judged
            self._judge_python_path = self.threads > 1 and self.has_python_path
            self._image_one_thread = self._judge_python_path and self.python_path_choice.one_thread_next()
            self._python_path_seconds = 0.0
        self.python_path_one_thread = self._image_one_thread
        python_path_seconds = 0.0
        for program, views, layers, banded, step in steps:
            if views is not None:
                if program is not None:
                    program.run(image)
                values.update(views)
                for i in layers:
                    runs[i] += 1
                for i in banded:
                    band_runs[i] += 1
            else:
                i, layer, inputs, out = step
                t0 = time.perf_counter()
                values[layer.output] = self.run_layer(layer, [values[t] for t in inputs], out, i)
                python_path_seconds += time.perf_counter() - t0
        self.python_path_one_thread = False
        self._python_path_seconds += python_path_seconds
        if stop == len(self.plan.layers) and self._judge_python_path:
            self.python_path_choice.record(self._image_one_thread, self._python_path_seconds)
        return values

    def run_from(self, start: int, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run layers ``start``.. of one image from ``tensors``, the tensors live at layer
        ``start``'s input (cached activations, as ``run_image(None, start, tensors)`` takes them),
        through the compiled runs: that call's floats and op counts. ``start`` is 0 or one past a
        segment end (``segment_ends``). Returns the tensors made, as :meth:`run_range` does."""
        image = tensors.get(self.plan.input_name)
        if start == 0:
            return self.run_range(np.ascontiguousarray(image, dtype=np.float32))
        values = {self.plan.input_name: self._image if image is None else np.ascontiguousarray(image, np.float32)}
        for name, value in tensors.items():
            if name != self.plan.input_name:
                storage = self._storage(name)
                np.copyto(storage, np.asarray(value, np.float32).reshape(storage.shape))
                values[name] = storage.reshape(np.shape(value))
        self._range_values = values
        return self.run_range(None, start)

    def _storage(self, name: str) -> np.ndarray:
        """The buffer a tensor lives in: its own, or for a view (Flatten, Reshape) its source's."""
        if self._producers is None:
            self._producers = {layer.output: layer for layer in self.plan.layers}
        t = name
        while t not in self.buffers:
            layer = self._producers.get(t)
            if layer is None or layer.op != Op.ALIAS:
                raise DyveError(f"{self.plan.path}: tensor {name!r} has no buffer to resume from")
            t = layer.inputs[0]
        return self.buffers[t]

    def _range_steps(self, start: int, stop: int) -> list:
        """run_range's steps from layer ``start`` to ``stop``: per part, (its program, or None when
        it has no kernels; its views; its layers; its banded convs; None) for a CompiledRun, (None,
        None, None, None, the layer's step) for a layer on the Python path."""
        if self.compiled_runs is None or start not in self._part_at or stop not in self._part_at or start > stop:
            raise DyveError(f"{self.plan.path}: run_range({start}, {stop}): needs compiled runs and a range "
                            f"between 0, {len(self.plan.layers)} and one past the segment ends "
                            f"{sorted(self.segment_ends)}")
        steps = [(part.program if len(part.program) else None, part.views,
                  [i for i in part.layers if i not in self.c_counted], part.banded, None)
                 if isinstance(part, CompiledRun) else (None, None, None, None, self._steps[part])
                 for part in self.compiled_runs[self._part_at[start]:self._part_at[stop]]]
        self._ranges[(start, stop)] = steps
        return steps

    # -- compiled runs ---------------------------------------------------------------------

    def _compilable(self, layer: Layer, values: dict[str, np.ndarray]) -> bool:
        """Whether a layer joins a compiled run: a conv without knobs or with SFMA alone
        (sfma_alone_compilable), a fully-connected layer without SPET, a pooling, a Concat whose
        inputs are all written in place, a ReLU or an Add of two tensors of its shape (a residual
        block's), an elementwise op of tensors of its shape and scalars (plain.is_simple_eltwise),
        or a view (none of them reading the image, which changes per call)."""
        if layer.op == Op.CONV:
            cp = self.layer_plans[layer.name]
            return cp.knobs is None or sfma_alone_compilable(cp)
        if layer.op in (Op.ALIAS, Op.FC):
            return (layer.op == Op.ALIAS or self.layer_plans[layer.name].spet is None) and not np.shares_memory(
                values[layer.inputs[0]], self._image)
        if layer.op == Op.CONCAT:
            return all(t in self.in_place for t in layer.inputs)
        if layer.op in (Op.RELU, Op.ELTWISE):
            return (plain.is_residual_add_or_relu(layer) or plain.is_simple_eltwise(layer)) and not any(
                np.shares_memory(values[t], self._image) for t in layer.inputs)
        return layer.op in (Op.MAXPOOL, Op.AVGPOOL, Op.GAP)

    def _compile_runs(self) -> list[CompiledRun | int]:
        """The layers in order as CompiledRuns and, between them, the indices of the layers left
        to the Python path (knobs, fully connected, softmax, ...). Each run's steps are built by
        the same code as forward(banded=True), given a program to append to."""
        parts: list[CompiledRun | int] = []
        values: dict[str, np.ndarray] = {self.plan.input_name: self._image}
        current: CompiledRun | None = None
        last = len(self.plan.layers) - 1
        skip = -1
        for i, layer, inputs, out in self._steps:
            if i == skip:
                continue
            if not self._compilable(layer, values):
                current = None
                parts.append(i)
                values[layer.output] = out if out is not None else values[inputs[0]].reshape(layer.out_shape)
                continue
            if current is None:
                current = CompiledRun(K.Program(self._image), [], {})
                parts.append(current)
            first_step = len(current.program)
            if i in self.conv_pool_bands and i + 1 <= last and i not in self.segment_ends:
                pool = self.plan.layers[i + 1]
                produced = {pool.output: self._conv_pool_band_steps(self.conv_pool_bands[i], values[inputs[0]],
                                                                     current.program)}
                current.layers += [i, i + 1]
                current.banded.append(i)
                skip = i + 1
            else:
                produced = {layer.output: self._layer_steps(layer, [values[t] for t in inputs], out, current.program)}
                current.layers.append(i)
            if len(current.program) > first_step:
                current.step_ranges.append((i, first_step, len(current.program)))
            values.update(produced)
            current.views.update(produced)
            if current.layers[-1] in self.segment_ends:
                current = None
        return parts

    def _layer_steps(self, layer: Layer, inputs: list[np.ndarray], out: np.ndarray | None,
                     program: K.Program) -> np.ndarray:
        """Append a compilable layer's steps (see _compilable) to ``program``; returns its output."""
        threads = self._threads_of(layer, program)
        if layer.op == Op.CONV:
            cp = self.layer_plans[layer.name]
            out2 = out.reshape(layer.out_shape[0], cp.geom.positions)
            if cp.knobs is None:
                plain.conv_plain(cp, self.scratch, inputs[0], out2, threads, program)
            else:  # SFMA alone: counted from the layer's own totals, not as a knob-free run
                state = sfma_alone_steps(cp, self.scratch, inputs[0], out2, threads, program)
                index = self.counter.index[layer.name]
                self.c_counted.add(index)
                self.counter.add_source(index, lambda: sfma_alone_totals(cp, state))
            return out
        if layer.op == Op.ALIAS:
            return inputs[0].reshape(layer.out_shape)
        if layer.op == Op.FC:
            K.gemv_bias(W=layer.weight, x=inputs[0].reshape(-1), bias=layer.bias, out=out.reshape(-1), relu=layer.relu,
                        threads=threads, program=program)
            return out
        if layer.op == Op.CONCAT:  # every input was written in place
            return out
        if plain.is_residual_add_or_relu(layer):
            plain.add_or_relu(layer, inputs, out, threads, program)
            return out
        if layer.op == Op.ELTWISE:
            plain.eltwise_into(layer, inputs, out, threads, program)
            return out
        plain.pool(layer, inputs[0], out, threads, program)
        return out

    def _threads_of(self, layer: Layer, program: K.Program | None) -> int:
        """Threads of a layer's kernels: all the engine's in a compiled run (sharing out a step
        costs a barrier there, not the start of a parallel loop), else by its work
        (EngineTuning.parallel_min_work)."""
        return self.threads if program is not None else self.layer_threads[layer.name]

    def _run_conv_pool_bands(self, bands: ConvPoolBands, x: np.ndarray) -> np.ndarray:
        """A conv layer and its max-pooling, band by band; returns the pooled map."""
        out = self._conv_pool_band_steps(bands, x)
        self.counter.plain_runs[bands.conv] += 1
        self.counter.plain_runs[bands.conv + 1] += 1
        self.counter.band_runs[bands.conv] += 1
        return out

    def _conv_pool_band_steps(self, bands: ConvPoolBands, x: np.ndarray,
                              program: K.Program | None = None) -> np.ndarray:
        """The kernels of a conv+pool pair, run now or appended to ``program``; returns the pooled map."""
        layer, pool = self.plan.layers[bands.conv], self.plan.layers[bands.conv + 1]
        out = self.buffers.get(pool.output)
        plain.conv_pool_bands(bands, self.layer_plans[layer.name], pool, self.scratch, x, out,
                              self._threads_of(layer, program), self._threads_of(pool, program), program)
        return out

    # -- runners (one per op; RUNNERS) ---------------------------------------------------

    def _conv(self, layer: Layer, inputs: list[np.ndarray], out: np.ndarray, index: int) -> np.ndarray:
        cp = self.layer_plans[layer.name]
        geom = cp.geom
        out2 = out.reshape(layer.out_shape[0], geom.positions)
        if cp.knobs is None:
            plain.conv_plain(cp, self.scratch, inputs[0], out2, self.kernel_threads)
            self.counter.plain_runs[index] += 1
            return out
        stands = False
        for g in range(geom.groups):
            counts, group_stands = conv_group_with_knobs(cp, self.scratch, inputs[0],
                                                         out2[g * geom.cout:(g + 1) * geom.cout], g,
                                                         self.kernel_threads)
            self.counter.add(index, counts)
            stands |= group_stands
        if not stands:
            # nothing was skipped: give the knob-free result exactly (ops were counted above)
            plain.conv_plain(cp, self.scratch, inputs[0], out2, self.kernel_threads)
            self.counter.add(index, fallback_costs(layer.dense_macs))
        return out

    def _fc(self, layer: Layer, inputs: list[np.ndarray], out: np.ndarray, index: int) -> np.ndarray:
        fp = self.layer_plans[layer.name]
        x = np.ascontiguousarray(inputs[0].reshape(-1))
        out = out.reshape(-1)
        if fp.spet is None:
            K.gemv_bias(W=layer.weight, x=x, bias=layer.bias, out=out, relu=layer.relu, threads=self.kernel_threads)
            self.counter.plain_runs[index] += 1
        else:
            self.counter.add(index, fc_spet(fp, x, out, self.kernel_threads))
        return out

    def _alias(self, layer: Layer, inputs: list[np.ndarray], out: None, index: int) -> np.ndarray:
        return inputs[0].reshape(layer.out_shape)

    def _relu(self, layer: Layer, inputs: list[np.ndarray], out: np.ndarray, index: int) -> np.ndarray:
        np.copyto(out, inputs[0].reshape(layer.out_shape))
        K.relu_inplace(x=out.reshape(-1))
        return out

    def _pool(self, layer: Layer, inputs: list[np.ndarray], out: np.ndarray, index: int) -> np.ndarray:
        plain.pool(layer, inputs[0], out, self.kernel_threads)
        return out

    def _gmp(self, layer: Layer, inputs: list[np.ndarray], out: np.ndarray, index: int) -> np.ndarray:
        x = inputs[0]
        np.max(x.reshape(x.shape[0], -1), axis=1, out=out.reshape(-1))
        return out

    def _lrn(self, layer: Layer, inputs: list[np.ndarray], out: np.ndarray, index: int) -> np.ndarray:
        a = layer.attrs
        K.lrn_across(x=inputs[0], out=out, size=a["size"], alpha=a["alpha"], beta=a["beta"], bias=a["bias"],
                     threads=self.kernel_threads)
        return out

    def _concat(self, layer: Layer, inputs: list[np.ndarray], out: np.ndarray, index: int) -> np.ndarray:
        channel = 0
        for name, t in zip(layer.inputs, inputs):
            if name not in self.in_place:  # written in place by its producer otherwise
                out[channel:channel + t.shape[0]] = t
            channel += t.shape[0]
        return out

    def _softmax(self, layer: Layer, inputs: list[np.ndarray], out: np.ndarray, index: int) -> np.ndarray:
        x = inputs[0]
        flat = x.reshape(-1, 1) if len(layer.out_shape) == 1 else x.reshape(x.shape[0], -1)
        K.softmax_columns(x=np.ascontiguousarray(flat), out=out.reshape(flat.shape))
        return out

    def _eltwise(self, layer: Layer, inputs: list[np.ndarray], out: np.ndarray, index: int) -> np.ndarray:
        if plain.is_simple_eltwise(layer):  # the compiled runs' kernel: the same bits on either path
            plain.eltwise_into(layer, inputs, out, self.kernel_threads)
        else:
            out[...] = plain.eltwise(layer, inputs)
        return out

    def _batchnorm(self, layer: Layer, inputs: list[np.ndarray], out: np.ndarray, index: int) -> np.ndarray:
        plain.batchnorm(layer, inputs[0], out)
        return out

    def _sum(self, layer: Layer, inputs: list[np.ndarray], out: np.ndarray, index: int) -> np.ndarray:
        plain.sum_inputs(inputs, out)
        return out

    def _transpose(self, layer: Layer, inputs: list[np.ndarray], out: np.ndarray, index: int) -> np.ndarray:
        plain.transpose(layer, inputs[0], out)
        return out


#: The runner of each op: (engine, layer, inputs, out, layer index) -> the layer's output.
RUNNERS: dict[Op, Callable[[Engine, Layer, list[np.ndarray], np.ndarray | None, int], np.ndarray]] = {
    Op.CONV: Engine._conv, Op.FC: Engine._fc, Op.ALIAS: Engine._alias, Op.RELU: Engine._relu,
    Op.MAXPOOL: Engine._pool, Op.AVGPOOL: Engine._pool, Op.GAP: Engine._pool, Op.GMP: Engine._gmp,
    Op.LRN: Engine._lrn, Op.CONCAT: Engine._concat, Op.SOFTMAX: Engine._softmax, Op.ELTWISE: Engine._eltwise,
    Op.BATCHNORM: Engine._batchnorm, Op.SUM: Engine._sum, Op.TRANSPOSE: Engine._transpose,
}
