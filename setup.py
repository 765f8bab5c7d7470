"""Build the Cython kernels of the engine (everything else is declared in pyproject.toml)."""
import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

import platform

# No -ffast-math: results must be reproducible run to run (fused multiply-adds are allowed: they
# are deterministic on a given machine; x86 and aarch64 may differ in the last bits).
COMPILE_ARGS = ["-O3", "-fopenmp", "-fno-fast-math"]
if platform.machine() in ("x86_64", "AMD64"):
    # built where it runs (pip install -e . / on the board), so the host's vector units are fair game
    COMPILE_ARGS.append("-march=native")
LINK_ARGS = ["-fopenmp"]

extensions = [
    Extension(
        "dyvedeep._kernels",
        ["dyvedeep/_kernels.pyx"],
        include_dirs=[numpy.get_include(), "dyvedeep"],
        depends=["dyvedeep/_simd.h", "dyvedeep/_program.h"],
        extra_compile_args=COMPILE_ARGS,
        extra_link_args=LINK_ARGS,
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    ),
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True, "initializedcheck": False},
    )
)
