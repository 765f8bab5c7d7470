"""Bench: batch-1 latency of the dense engine, of DyVEDeep (a knob file), of onnxruntime on the
same images and threads, and of the papers' baseline (Caffe's im2col + sgemm, one thread,
``engine.CaffeBaseline``), measured in one run (blocks of images alternating over rounds so
that machine noise hits all engines alike); reports medians after warm-up and the speed-ups.

With ``--load N``, N busy processes compete, and every round times each engine twice: with the
processes paused (idle) and running (loaded), so that "latency under load / idle latency" comes
from one run; with several threads the dense engine on one thread is timed too, the fallback a
user would otherwise take, and a reference parallel loop of as many threads (ReferenceLoop):
what the machine's scheduler gives that many threads under the load, the yardstick of the
dense engine's ratio."""
from __future__ import annotations

import argparse
import contextlib
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import _kernels as K
from .engine import CaffeBaseline, Engine, set_blas_threads
from .errors import DyveError
from .cli_support import Progress, load_plan, onnxruntime_session, open_dataset, platform_info
from .gates import engine_for
from .io_utils import write_json_atomic
from .knobs import load_knobs
from .plan import Plan, build_plan

DEFAULT_DATA = {"cifar10": "cifar10:test", "imagenet": "imagenet-sample:test"}
#: Seconds of untimed turns of every engine before the timed rounds (see bench()).
WARM_SECONDS = 1.0
#: Seconds given to the scheduler after the busy processes are paused or resumed.
SETTLE_SECONDS = 0.05
#: Each engine's block starts with untimed runs for at least this long (and at least its warm-up
#: images): the engine before keeps its thread pool spinning after its last run (onnxruntime's
#: for some 25 ms: cifar10_quick's next two runs on two threads took 12-13 ms against 0.15 ms),
#: longer than five images of a small network take.
BLOCK_WARM_SECONDS = 0.05


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000.0


def _idle_median_ms(run: Callable[[np.ndarray], Any], batch: np.ndarray, n: int = 9) -> float:
    """Median of n timed runs after BLOCK_WARM_SECONDS of untimed ones (another engine's pool
    may still be spinning)."""
    start = time.perf_counter()
    while time.perf_counter() - start < BLOCK_WARM_SECONDS:
        run(batch)
    return statistics.median(_timed(lambda: run(batch)) for _ in range(n))


def bench(model: Path, images: np.ndarray, knobs_path: Path | None, threads: int, warmup: int,
          with_onnxruntime: bool = True, rounds: int = 3, with_caffe: bool = True,
          load: "BusyLoad | None" = None) -> dict[str, Any]:
    """Median per-image latency (ms) of each engine over ``images`` (N, C, H, W), batch 1. The
    Caffe-style baseline always runs on one thread (the papers' sequential baseline). With a
    ``load``, each engine is also timed while it runs (keys ``*_loaded_ms``, ``load_ratio_*``)."""
    plan = build_plan(model)
    knobs = load_knobs(knobs_path, plan) if knobs_path else None
    dense = Engine(plan, threads=threads)
    dyve = engine_for(plan, knobs, threads) if knobs is not None else None  # with gates: a GatedEngine
    session, onnxruntime_note = None, "skipped (--no-onnxruntime)"
    if with_onnxruntime:
        try:
            session = onnxruntime_session(plan.path, threads)
        except DyveError as err:  # a board without onnxruntime still gets our two engines
            onnxruntime_note = f"not run: {err}"
    input_name = session.get_inputs()[0].name if session is not None else None
    runners: dict[str, Callable[[np.ndarray], Any]] = {"dense": dense.run}
    if dyve is not None:
        runners["dyvedeep"] = dyve.run
    if session is not None:
        runners["onnxruntime"] = lambda b: session.run(None, {input_name: b})
    if with_caffe:
        runners["caffe"] = CaffeBaseline(plan).run
    if load is not None and threads > 1:
        dense_1thread = Engine(plan, threads=1)
        runners["dense_1thread"] = dense_1thread.run
    conditions = ("idle", "loaded") if load is not None else ("idle",)
    times: dict[tuple[str, str], list[float]] = {(name, condition): [] for name in ENGINES for condition in conditions}
    dense_one_thread = 0  # timed idle runs in which the dense engine took one thread (ThreadChoice)
    # Each engine runs a block of images on its own (so that one engine's idle, spinning thread
    # pool never competes with another's), and the blocks alternate over several rounds (so
    # that slow drifts of the machine hit every engine alike). Before the first round, the
    # engines take turns until the CPU has been busy for WARM_SECONDS: a core that was idle
    # runs slower for its first ~0.2 s, which would favour whichever engine is timed later.
    set_blas_threads(threads)
    if load is not None:
        load.run(False)
    start = time.perf_counter()
    while time.perf_counter() - start < WARM_SECONDS:
        for run in runners.values():
            for x in images[:max(warmup, 1)]:
                run(x[None])
    if load is not None and threads > 1:  # sized idle and warm to the dense engines' times
        for name, engine, n in (("reference", dense, threads), ("reference_1thread", dense_1thread, 1)):
            runners[name] = ReferenceLoop(n, _idle_median_ms(engine.run, images[0][None])).run
    progress = Progress("bench", rounds * len(conditions) * len(runners) * len(images))
    done = 0
    for _ in range(rounds):
        for condition in conditions:
            if load is not None:
                load.run(condition == "loaded")
            for name, run in runners.items():
                block_start = time.perf_counter()
                for x in images[:warmup]:
                    run(x[None])
                while time.perf_counter() - block_start < BLOCK_WARM_SECONDS:
                    run(images[0][None])
                for x in images[warmup:]:
                    times[(name, condition)].append(_timed(lambda: run(x[None])))
                    if name == "dense" and condition == "idle":
                        dense_one_thread += dense.last_image_took_one_thread()
                done += len(images)
                progress.update(done)
    if load is not None:
        load.run(False)
    med = {key: (statistics.median(v) if v else None) for key, v in times.items()}
    idle = {name: med[(name, "idle")] for name in ENGINES}
    if idle["dyvedeep"] is None:
        idle["dyvedeep"] = idle["dense"]
    result = {
        "model": str(model),
        "knobs": str(knobs_path) if knobs_path else None,
        "threads": threads,
        "n_images": len(images) - warmup,
        "warmup": warmup,
        "rounds": rounds,
        "latency_dense_ms": idle["dense"],
        "latency_dyvedeep_ms": idle["dyvedeep"],
        "latency_onnxruntime_ms": idle["onnxruntime"],
        "speedup": idle["dense"] / idle["dyvedeep"] if idle["dyvedeep"] else None,
        "speedup_vs_onnxruntime": (idle["onnxruntime"] / idle["dyvedeep"]) if idle["onnxruntime"] else None,
        "dense_vs_onnxruntime": (idle["dense"] / idle["onnxruntime"]) if idle["onnxruntime"] else None,
        "latency_caffe_ms": idle["caffe"],
        "speedup_vs_caffe": (idle["caffe"] / idle["dyvedeep"]) if idle["caffe"] else None,
        "onnxruntime_note": "" if session is not None else onnxruntime_note,
        "dense_runs_on_one_thread": dense_one_thread,
        "load": load.n if load is not None else 0,
        "platform": platform_info(),
    }
    if load is not None:
        for name in ENGINES:
            loaded = med[(name, "loaded")]
            result[f"latency_{name}_loaded_ms"] = loaded
            result[f"load_ratio_{name}"] = loaded / idle[name] if loaded and idle[name] else None
        result["latency_dense_1thread_ms"] = idle["dense_1thread"]
        result["latency_reference_ms"] = idle["reference"]
        result["latency_reference_1thread_ms"] = idle["reference_1thread"]
    return result


#: The engines bench can time (under --load with several threads: dense_1thread, the dense engine
#: on one thread, and the ReferenceLoop on as many threads and on one, each sized to the dense
#: engine's idle time on them).
ENGINES = ("dense", "dyvedeep", "onnxruntime", "caffe", "dense_1thread", "reference", "reference_1thread")


class ReferenceLoop:
    """The yardstick of a bench under ``--load``: a parallel loop of ``threads`` threads over
    units of multiply-adds on registers, each unit taken by whichever thread is free, with no
    wait but the loop's end (``_kernels.yardstick``), sized to take about ``target_ms`` idle. A
    thread the scheduler takes off its core costs it only that thread's share of the work, so its
    loaded / idle latency is what the machine gives that many threads of one process under the
    load: what no program of as many threads can better by its own design."""

    #: Units per thread: small, so that the threads still running share out a missing one's.
    UNITS_PER_THREAD = 64

    def __init__(self, threads: int, target_ms: float) -> None:
        self.threads, self.units = threads, self.UNITS_PER_THREAD * threads
        iters = 64
        # the fastest of three: one slow run (a thread late to start) would size the loop short
        while (took := min(_timed(lambda: K.yardstick(threads, self.units, iters)) for _ in range(3))) < 1.0 \
                and iters < 1 << 24:
            iters *= 4
        self.iters = max(1, round(iters * target_ms / took))

    def run(self, _batch: np.ndarray | None = None) -> float:
        """One run of the loop (the batch, as the engines are given one, is not read)."""
        return K.yardstick(self.threads, self.units, self.iters)


class BusyLoad:
    """N busy processes (a Python loop each): a competing load that anyone can reproduce
    (``--load``). They are paused (SIGSTOP) for the idle blocks of a bench and resumed
    (SIGCONT) for the loaded ones."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]

    def run(self, running: bool) -> None:
        for proc in self.procs:
            proc.send_signal(signal.SIGCONT if running else signal.SIGSTOP)
        time.sleep(SETTLE_SECONDS)

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def busy_load(n: int):
    """A BusyLoad of n processes for the duration (None for n = 0)."""
    load = BusyLoad(n) if n else None
    try:
        yield load
    finally:
        if load is not None:
            load.close()


def data_spec(model: str | Path, plan: Plan, data: str | None) -> str:
    """The images to time: ``data``, or the test split of the model's labels (DEFAULT_DATA)."""
    spec = data or DEFAULT_DATA.get(plan.labels or "", None)
    if spec is None:
        raise DyveError(f"{model}: no default dataset for its labels; give --data")
    return spec


def cmd_bench(args: argparse.Namespace) -> int:
    plan = load_plan(args.model)
    spec = data_spec(args.model, plan, args.data)
    dataset = open_dataset(plan, spec, args.images + args.warmup, args.mirror)
    if len(dataset) <= args.warmup:
        raise DyveError(f"{spec}: {len(dataset)} images, need more than --warmup {args.warmup}")
    images = dataset.images(0, len(dataset))
    if args.load < 0:
        raise DyveError(f"--load {args.load}: expected a number of busy processes >= 0")
    with busy_load(args.load) as load:
        result = bench(args.model, images, args.knobs, args.threads, args.warmup, not args.no_onnxruntime, args.rounds,
                       not args.no_caffe, load)
    print(f"threads: {result['threads']}, images: {result['n_images']} (after {result['warmup']} warm-up)"
          + (f"; idle (the {args.load} busy processes paused) and loaded (running) blocks alternate" if args.load else ""))
    timed = result["n_images"] * result["rounds"]
    print(f"median latency, dense engine: {result['latency_dense_ms']:.3f} ms"
          + (f" ({result['dense_runs_on_one_thread']} of {timed} timed runs took one thread)"
             if result["threads"] > 1 else ""))
    if args.knobs:
        print(f"median latency, DyVEDeep:     {result['latency_dyvedeep_ms']:.3f} ms "
              f"(speed-up over dense {result['speedup']:.2f}x)")
    if result["latency_onnxruntime_ms"] is not None:
        print(f"median latency, onnxruntime:  {result['latency_onnxruntime_ms']:.3f} ms "
              f"(dense engine / onnxruntime = {result['dense_vs_onnxruntime']:.2f}x)")
    else:
        print(f"onnxruntime: {result['onnxruntime_note']}")
    if result["latency_caffe_ms"] is not None:
        print(f"median latency, Caffe-style baseline (im2col + sgemm, 1 thread): {result['latency_caffe_ms']:.3f} ms "
              f"(speed-up of {'DyVEDeep' if args.knobs else 'the dense engine'} over it "
              f"{result['speedup_vs_caffe']:.2f}x)")
    if args.load:
        print_load(result)
    if args.json:
        write_json_atomic(args.json, result)
    return 0


def print_load(result: dict[str, Any]) -> None:
    """The loaded latencies beside the idle ones, and their ratios, from one bench run."""
    names = {"dense": "dense engine", "dyvedeep": "DyVEDeep", "onnxruntime": "onnxruntime"}
    for name, label in names.items():
        if result.get(f"latency_{name}_loaded_ms") is not None:
            print(f"under --load {result['load']}, {label}: {result[f'latency_{name}_loaded_ms']:.3f} ms "
                  f"(loaded / idle = {result[f'load_ratio_{name}']:.2f}x)")
    one = result.get("latency_dense_1thread_loaded_ms")
    if one is not None:
        print(f"under --load {result['load']}, dense engine on 1 thread: {one:.3f} ms "
              f"({result['threads']} threads / 1 thread, both loaded = {result['latency_dense_loaded_ms'] / one:.2f}x)")
    two, one = result.get("latency_reference_loaded_ms"), result.get("latency_reference_1thread_loaded_ms")
    if two is not None and one is not None:
        print(f"under --load {result['load']}, reference loop (multiply-adds, no wait but its end, as long idle as "
              f"the dense engine): {result['threads']} threads loaded / idle = {result['load_ratio_reference']:.2f}x, "
              f"{result['threads']} threads / 1 thread, both loaded = {two / one:.2f}x: what this machine gives "
              f"{result['threads']} threads and 1 under this load")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``bench``."""
    p = subparsers.add_parser("bench",
                              help="batch-1 latency: dense engine, DyVEDeep, onnxruntime, Caffe-style baseline")
    p.add_argument("model", type=Path, metavar="MODEL.onnx")
    p.add_argument("--knobs", type=Path, default=None, metavar="KNOBS.yaml")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data", default=None, metavar="SPEC", help="images to time (default: the model's test split)")
    p.add_argument("--images", type=int, default=30, help="images timed after warm-up, per round (default 30)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of each engine's block (default 3)")
    p.add_argument("--mirror", type=Path, default=None, metavar="DIR")
    p.add_argument("--no-onnxruntime", action="store_true", help="skip the onnxruntime reference")
    p.add_argument("--no-caffe", action="store_true",
                   help="skip the papers' baseline (Caffe-style: im2col + sgemm, 1 thread)")
    p.add_argument("--json", type=Path, default=None, metavar="OUT.json")
    p.add_argument("--load", type=int, default=0, metavar="N", help="N busy processes compete; idle and loaded blocks alternate (default 0)")
    p.set_defaults(func=cmd_bench)
