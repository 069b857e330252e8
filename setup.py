"""Install: pip install -e ".[test]".

Native sources (csrc/) are compiled on first use, so a plain install needs no compiler.
"""
from setuptools import find_packages, setup

setup(
    name="aia_kernels",
    version="0.1.0",
    description="Fused GPU kernels for Attention-in-Attention (AIA) video modules",
    packages=find_packages(include=["aia_kernels", "aia_kernels.*"]),
    package_data={"aia_kernels": ["../csrc/*"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.5", "triton>=3.2", "ninja", "numpy"],
    extras_require={"test": ["pytest", "pytest-benchmark", "matplotlib"]},
)
