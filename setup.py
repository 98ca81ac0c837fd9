"""Build the Cython data plane (ext/) as viommu._dataplane; everything else is in pyproject.toml."""

from Cython.Build import cythonize
from setuptools import Extension, setup

setup(
    ext_modules=cythonize(
        [
            Extension(
                "viommu._dataplane",
                ["ext/dataplane.pyx"],
                depends=["ext/engine.pxi", "ext/barrier.h"],
                include_dirs=["ext"],
                extra_compile_args=["-O2"],
            )
        ],
        compiler_directives={"language_level": "3", "boundscheck": False, "wraparound": False},
    ),
)
