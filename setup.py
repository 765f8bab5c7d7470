"""Build the Cython kernels of the engine (everything else is declared in pyproject.toml)."""
import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

import platform

# No -ffast-math: the engine's results must be reproducible and its dense path exact.
COMPILE_ARGS = ["-O3", "-fopenmp", "-fno-fast-math", "-ffp-contract=off"]
if platform.machine() in ("x86_64", "AMD64"):
    # built where it runs (pip install -e . / on the board), so the host's vector units are fair game
    COMPILE_ARGS.append("-march=native")
LINK_ARGS = ["-fopenmp"]

extensions = [
    Extension(
        "dyvedeep._kernels",
        ["dyvedeep/_kernels.pyx"],
        include_dirs=[numpy.get_include()],
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
