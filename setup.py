"""Install: pip install -e ".[test]".

The native backend (csrc/) is compiled on first use by torch.utils.cpp_extension.load,
so a plain install needs no compiler. Set AIA_BUILD_NATIVE=1 to build it ahead of time.
"""
import os

from setuptools import find_packages, setup

ext_modules, cmdclass = [], {}
if os.environ.get("AIA_BUILD_NATIVE") == "1":
    from aia_kernels_build import native_extensions  # noqa: E402  (setup-time helper, see csrc/)
    ext_modules, cmdclass = native_extensions()

setup(
    name="aia_kernels",
    version="0.1.0",
    description="Fused GPU kernels for Attention-in-Attention (AIA) video modules",
    packages=find_packages(include=["aia_kernels", "aia_kernels.*"]),
    package_data={"aia_kernels": ["../csrc/*"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.5", "triton>=3.2", "ninja", "numpy"],
    extras_require={"test": ["pytest", "pytest-benchmark", "matplotlib"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
