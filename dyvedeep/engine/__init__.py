"""The engine: runs a plan on the Cython kernels with the dynamic-effort knobs, counting ops exactly.

Modules: ``core`` (the Engine: dispatch, compiled runs), ``tuning`` (EngineTuning), ``memory``
(aligned buffers, buffer plan, scratch), ``conv_plan`` (conv geometry, route, knob plan),
``bands`` (conv+pool bands), ``plain`` (the knob-free kernels), ``knob_path`` (a conv layer's
knob path) with ``sfma``, ``sdss`` and ``spet`` (one per knob), ``counting`` (OpCounter and the
knobs' cost functions); ``caffe_baseline`` (the papers' baseline: Caffe's im2col + sgemm, one
thread).
"""
from .bands import ConvPoolBands, PoolBand
from .caffe_baseline import CaffeBaseline, im2col
from .conv_plan import ConvGeometry, ConvKnobPlan, ConvPlan, ConvRoute, choose_route, direct_lane_use
from .core import RUNNERS, CompiledRun, Engine, batch_and_outputs, layer_work, set_blas_threads
from .counting import BILINEAR_FILL_OPS, COUNTER_FIELDS, SFMA_TEST_OPS, OpCounter
from .memory import ALIGN, Scratch, aligned_copy, aligned_zeros, packed_cols, plan_buffers, tensor_readers
from .sdss import SdssGrid, cell_corner_max, sdss_grid
from .sfma import sfma_spread
from .spet import FcPlan, fc_input_order, spet_channel_order, spet_lead
from .tuning import DEFAULT_TUNING, EngineTuning

__all__ = [
    "ALIGN", "BILINEAR_FILL_OPS", "COUNTER_FIELDS", "DEFAULT_TUNING", "RUNNERS", "SFMA_TEST_OPS",
    "CaffeBaseline", "CompiledRun", "ConvGeometry", "ConvKnobPlan", "ConvPlan", "ConvPoolBands", "ConvRoute", "Engine",
    "EngineTuning", "FcPlan", "OpCounter", "PoolBand", "Scratch", "SdssGrid",
    "aligned_copy", "aligned_zeros", "batch_and_outputs", "cell_corner_max", "choose_route", "direct_lane_use", "fc_input_order",
    "im2col", "layer_work", "packed_cols", "plan_buffers", "sdss_grid", "set_blas_threads", "sfma_spread",
    "spet_channel_order", "spet_lead", "tensor_readers",
]
