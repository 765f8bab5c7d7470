"""The engine's tuning: the thresholds that choose threads, conv routes and conv+pool bands.

One frozen :class:`EngineTuning` per engine (``Engine(plan, tuning=...)``); tests and tools that
need another choice pass their own instead of changing module globals. The defaults are the
measured ones (docs/engine.md); changing them changes speed, never floats or op counts.
"""
from __future__ import annotations

from dataclasses import dataclass

from .. import _kernels as K


@dataclass(frozen=True)
class EngineTuning:
    """Thresholds of the engine's speed choices."""

    #: On the Python path, a layer gets several threads for its own kernels only above this much
    #: work (MACs, or 8 per output or input element for the layers without weights, whichever is
    #: more: pooling reads its whole input): starting a parallel loop costs ~6 us, more than small
    #: kernels take (SqueezeNet on 2 threads: 1M ran 5 % faster than 2M, 0.5M no better). In a
    #: compiled run every step is shared by all threads: a barrier costs far less.
    parallel_min_work: int = 1_000_000
    #: Whether a conv layer and the max-pooling that alone reads it may run band by band
    #: (ConvPoolBands, below). Not with the AVX2 tiles: there SqueezeNet's strided conv1 takes the
    #: channel-vector route on one and two threads, and on two its bands (each a conv step and a
    #: pooling step) cost more than the L2 they keep (conv1 + pool1 840-910 us banded, 745-750 us
    #: whole; the network 0.98x-0.99x the time whole, SqueezeNet v1.0 0.93x; on one thread
    #: 0.985x-1.015x). Decided per instruction set, never per thread count: the route of a layer
    #: may differ with the threads, and a band's shared rows count twice in the executed MACs,
    #: which must not depend on them (docs/notes/2026-12-05-yardstick-and-unrolling.md).
    conv_pool_bands: bool = K.ISA != "avx2"
    #: A conv layer on the direct or phase route (no knobs) whose only reader is a max-pooling
    #: runs with it band by band of output rows (ConvPoolBands) when its output has at least this
    #: many bytes: each band of the conv output is pooled while it is still in L2, instead of the
    #: whole map going out to memory and back (SqueezeNet's conv1: 3.2 MB).
    conv_pool_min_bytes: int = 1 << 20
    #: Bytes of one band of the conv output in a conv+pool pair (well inside L2).
    conv_pool_band_bytes: int = 1 << 19
    #: In a conv+pool band the conv's threads share out its 8-row blocks of weights (output
    #: channels), not its tiles (positions): the pooling shares out planes, so that each thread
    #: then pools the planes it has just written, in its own core's cache. SqueezeNet v1.1's
    #: conv1 + pool1 on two threads: the pooling 106 -> 50 us, the conv 258 -> 284 us
    #: (docs/notes/2026-12-05-direct-route-threads.md).
    conv_pool_rows_first: bool = True
    #: The direct conv route needs its vectors this full: maps 16 or 32 wide, or 1x1 layers
    #: without padding, ran 1.15x-1.8x faster direct; with vectors per output row, 56-, 27- and
    #: 14-wide maps (0.875, 0.84 and 0.875 of the lanes) ran as fast or faster on the panel route ...
    direct_min_lane_use: float = 0.9
    #: ... or this full in an engine of several threads, with the AVX-512 tiles: there the panel
    #: route's threads each unfold the same panels (they share out the weights of a small map)
    #: and the unfold route's GEMM waits on an unfolding step; the direct route unfolds nothing.
    #: Vectors across the rows of an 8-wide map fill 8 of 10 lanes: resnet56_caffe's 8 x 8
    #: layers on the direct route ran the network 0.89x the time on two threads (0.97x on one);
    #: SqueezeNet's 13 x 13 3x3 layers (13 of 15) 0.89x-0.95x on two threads, 1.02x-1.13x on
    #: one. With the AVX2 tiles the same SqueezeNet layers ran 1.14x-1.25x slower direct on two
    #: threads: the AVX2 and NEON builds keep full vectors
    #: (docs/notes/2026-12-05-direct-route-threads.md).
    direct_min_lane_use_threads: float = 0.75 if K.ISA == "avx512" else 0.9
    #: ... and at most this many output channels per output position (past it the weights are the
    #: large operand, and the unfolded panels, read in order, feed the GEMM better).
    direct_max_rows_per_position: int = 2
    #: The direct route's threads share out its 8-row blocks of weights (each thread then reads
    #: every input row) when it has fewer tiles than this per thread, else its tiles (positions).
    direct_rows_below_tiles: int = 4
    #: ... for kernels of 3x3 or larger whose (padded) input is larger than their weights: with
    #: the AVX-512 tiles, positions whenever each thread gets a tile, so that a thread reads
    #: the input rows that its own share of the layer before wrote: ResNets' 16 x 16 layers (six
    #: tiles) on two threads took resnet56_caffe from 1.39x-1.42x onnxruntime's time to
    #: 1.27x-1.33x. SqueezeNet's 13 x 13 1x1 layers (four tiles) ran 1.1x-1.4x slower so, and
    #: cifar10_quick's conv2 (weights twice its input) 1.03x-1.08x the network's time; the AVX2
    #: tiles gained nothing (docs/notes/2026-12-05-direct-route-threads.md).
    direct_rows_below_tiles_kxk: int = 1 if K.ISA == "avx512" else 4
    #: The channel-vector route (K.conv_ocvec: vectors over output channels, a broadcast input
    #: per position, as onnxruntime's NCHWc kernels) for every knob-free stride-1 layer of 3x3 (or
    #: larger) kernels (output channels: below), in place of the routes above;
    #: AVX-512 and AVX2 tiles (the NEON build has none: its times are emulated only). Network
    #: time against the routes above, AVX-512: SqueezeNet v1.1 0.94x on one thread, 0.95x on
    #: two; resnet56_caffe 0.99x / 0.91x-1.04x, median 0.95x; AVX2 tiles (on the same host):
    #: 0.87x / 0.87x and 0.90x / 0.90x (docs/notes/2026-12-05-channel-vector-route.md).
    ocvec_route: bool = K.ISA in ("avx512", "avx2")
    #: ... whose output channels are a multiple of this: with the AVX2 tiles 16 (their passes of
    #: 16 channels skip a block's empty ones: cifar10_quick, cifar10_full, resnet20_caffe and
    #: resnet56_caffe 0.77x-0.83x the time on one thread, 0.75x-0.90x on two, against 0.89x-0.94x
    #: with 64); the AVX-512 tile computes all 64 channels of a block.
    ocvec_channel_multiple: int = 16 if K.ISA == "avx2" else 64
    #: ... and for 1x1 layers whose weights make them take the panel or unfold route (SqueezeNet's
    #: conv10: 512 -> 1000 channels, the last block padded with zero weights): AVX2 tiles, where
    #: the GEMM tile holds 8 accumulators (SqueezeNet v1.1 0.95x the time on one and two
    #: threads); not AVX-512 (0.99x on one thread, 1.01x on two). The 1x1 layers of the direct
    #: route ran 1.08x-1.42x faster on it with the AVX2 tiles on one thread, but 0.79x-1.11x
    #: on two.
    ocvec_pointwise: bool = K.ISA == "avx2"
    #: ... and for 1x1 layers of the direct route with output channels a multiple of 16: AVX2
    #: tiles (SqueezeNet v1.1 0.94x-0.97x the time on one thread, its squeeze and expand1x1
    #: layers 1.08x-1.42x faster; on two threads 0.950x-0.961x once the route's threads claimed
    #: units of 24 positions, 0.79x-1.11x per layer before: docs/notes/2026-12-05-claimed-units.md);
    #: not AVX-512 (1.02x-1.05x the time on one thread: its tile always computes 64 channels).
    ocvec_pointwise_direct: bool = K.ISA == "avx2"
    #: ... and, in an engine of at most this many threads, for strided layers of 3x3 or larger
    #: (each position's tap (0, 0) stride rows and columns apart), with output channels as
    #: above; one that feeds a max-pooling runs with it band by band (ConvPoolBands), each band
    #: a range of positions, pooled by output rows, mostly by the thread that wrote them. AVX2 tiles,
    #: one thread: SqueezeNet v1.1's conv1 + pool1 1571 -> 1012 us, the network 0.945x;
    #: SqueezeNet v1.0's (7x7, 96 channels) 7889 -> 4589 us, 0.873x; resnet20_caffe and
    #: resnet56_caffe (two strided 3x3 layers each) 0.95x-0.96x and 0.98x-0.995x. On two threads
    #: SqueezeNet took 1.01x-1.06x the time in most processes while the threads shared out
    #: fixed parts (docs/notes/2026-12-05-conv1-bands.md); once they claimed units of 24
    #: positions, 0.984x-0.985x, SqueezeNet v1.0 0.934x-0.938x, the ResNets 0.985x-0.989x
    #: (AVX2 tiles; docs/notes/2026-12-05-claimed-units.md). The AVX-512 tiles were measured
    #: on one thread only.
    ocvec_strided_threads: int = {"avx2": 2, "avx512": 1}.get(K.ISA, 0)


DEFAULT_TUNING = EngineTuning()
