"""DyVEDeep reproducibility harness: Caffe-family CNNs -> ONNX -> a Cython engine with the
three dynamic-effort knobs (SPET, SDSS, SFMA), exact op accounting, calibration and benchmarks.

Stages (one module each, data flows one way):
fetch -> convert (to ONNX) -> plan (engine graph) -> engine / knobs -> evaluate, bench, calibrate.
"""
__version__ = "0.1.0"
