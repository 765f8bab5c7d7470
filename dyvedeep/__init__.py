"""DyVEDeep reproducibility harness: Caffe-family CNNs -> ONNX -> a Cython engine with the
three dynamic-effort knobs (SPET, SDSS, SFMA), exact op accounting, calibration and benchmarks.

Stages (one module each, data flows one way):
fetch -> convert (to ONNX) -> plan (engine graph) -> engine / knobs -> evaluate, bench, calibrate.
"""
import os as _os

# Idle OpenMP threads spin a short while (100,000 turns, well under a millisecond here) before
# they sleep: the layers of one image start their parallel loops microseconds apart, and waking a
# sleeping thread made each loop cost ~60 us more with two threads (OMP_WAIT_POLICY=PASSIVE),
# while a thread that spins for long would keep a core from BLAS or another engine between
# images. A user's OMP_WAIT_POLICY or GOMP_SPINCOUNT wins (set before libgomp loads).
if "OMP_WAIT_POLICY" not in _os.environ:
    _os.environ.setdefault("GOMP_SPINCOUNT", "100000")

__version__ = "0.1.0"
