"""Install: pip install -e ".[test]".

Native sources (csrc/) are compiled on first use, so installing needs no compiler.
A regular (non-editable) install copies csrc/ into the package as aia_kernels/csrc.
"""
import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py


class BuildPyWithSources(build_py):
    """Ship the C++/CUDA sources with the package, for the first-use build."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "aia_kernels" / "csrc"
        shutil.copytree(Path(__file__).parent / "csrc", target, dirs_exist_ok=True)


setup(
    name="aia_kernels",
    version="0.1.0",
    description="Fused GPU kernels for Attention-in-Attention (AIA) video modules",
    packages=find_packages(include=["aia_kernels", "aia_kernels.*"]),
    package_data={"aia_kernels.triton": ["tuned_tiles.json"]},  # the tuned tile table, once a GPU wrote one
    python_requires=">=3.10",
    install_requires=["torch>=2.5", "triton>=3.2", "ninja", "numpy"],
    extras_require={"test": ["pytest", "pytest-benchmark", "matplotlib"]},
    cmdclass={"build_py": BuildPyWithSources},
)
