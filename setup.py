"""Build the Cython kernels of the engine (everything else is declared in pyproject.toml).

The instruction set follows the build host (-march=native on x86-64; the board's compiler default
on aarch64). DYVEDEEP_ISA=avx2 builds the AVX2/FMA kernels on an AVX-512 host (-mno-avx512f), as
an AVX2-only machine would get them (`make test-avx2`); the tile shapes for each instruction set
are chosen in dyvedeep/kernels/dv_vector.h."""
import glob
import os
import platform

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

# No -ffast-math: results must be reproducible run to run (fused multiply-adds are allowed: they
# are deterministic on a given machine; x86 and aarch64 may differ in the last bits).
COMPILE_ARGS = ["-O3", "-fopenmp", "-fno-fast-math"]
# The kernels' 16-float vectors are passed by value only between static functions of one unit:
# GCC's note that their ABI differs without AVX-512 (or on aarch64) concerns no real interface.
COMPILE_ARGS.append("-Wno-psabi")
ISA = os.environ.get("DYVEDEEP_ISA", "native")
ISA_FLAGS = {"native": [], "avx2": ["-mno-avx512f"]}
if ISA not in ISA_FLAGS:
    raise SystemExit(f"DYVEDEEP_ISA={ISA}: expected one of {', '.join(ISA_FLAGS)}")
if ISA != "native" and platform.machine() not in ("x86_64", "AMD64"):
    raise SystemExit(f"DYVEDEEP_ISA={ISA}: x86-64 only (this is {platform.machine()})")
if platform.machine() in ("x86_64", "AMD64"):
    # built where it runs (pip install -e . / on the board), so the host's vector units are fair game
    COMPILE_ARGS.append("-march=native")
    COMPILE_ARGS += ISA_FLAGS[ISA]
LINK_ARGS = ["-fopenmp"]

extensions = [
    Extension(
        "dyvedeep._kernels",
        ["dyvedeep/_kernels.pyx"],
        include_dirs=[numpy.get_include(), "dyvedeep"],
        depends=["dyvedeep/_program.h", *sorted(glob.glob("dyvedeep/kernels/*.h"))],
        extra_compile_args=COMPILE_ARGS,
        extra_link_args=LINK_ARGS,
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    ),
]

setup(ext_modules=cythonize(extensions))
