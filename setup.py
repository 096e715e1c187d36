"""Builds the optional C++ CPU engine in csrc/ into ``pcfast._C``.

Everything declarative lives in pyproject.toml. pcfast works without the extension (the
``torch`` backend), so a failed or skipped build only warns. Set ``PCFAST_NO_EXT=1`` to skip it.
"""
import glob
import os
import sys

from setuptools import setup

ext_modules, cmdclass = [], {}
sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
if sources and os.environ.get("PCFAST_NO_EXT") != "1":
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension

        openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
        ext_modules = [
            CppExtension(
                "pcfast._C",
                sources,
                extra_compile_args=["-O3", "-std=c++17", *openmp],
                extra_link_args=openmp,
            )
        ]

        class OptionalBuildExtension(BuildExtension):
            """Build the extension, but let installation succeed if the compiler fails."""

            def run(self):
                try:
                    super().run()
                except Exception as exc:  # pragma: no cover - depends on the toolchain
                    print(f"warning: pcfast._C was not built ({exc}); the torch backend still works")

            def build_extension(self, ext):
                try:
                    super().build_extension(ext)
                except Exception as exc:  # pragma: no cover
                    print(f"warning: pcfast._C was not built ({exc}); the torch backend still works")

        cmdclass = {"build_ext": OptionalBuildExtension.with_options(use_ninja=False)}
    except ImportError:  # torch missing at build time: pure-Python install
        print("warning: torch not importable at build time; building pcfast without pcfast._C")

setup(ext_modules=ext_modules, cmdclass=cmdclass)
