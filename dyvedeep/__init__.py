"""DyVEDeep reproducibility harness: Caffe-family CNNs -> ONNX -> a Cython engine with the
three dynamic-effort knobs (SPET, SDSS, SFMA), exact op accounting, calibration and benchmarks.

Stages (one module each, data flows one way):
fetch -> convert (to ONNX) -> plan (engine graph) -> engine / knobs -> evaluate, bench, calibrate.
"""
import os as _os

# The engine's OpenMP loops and the BLAS threads take turns; idle OpenMP threads must sleep rather
# than spin, or on a small machine they steal the cores BLAS needs (set before libgomp loads).
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
