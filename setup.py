"""Install: pip install -e ".[test]".

Native sources (csrc/) are compiled on first use, so installing needs no compiler.
A regular (non-editable) install copies csrc/ into the package as aia_kernels/csrc.

Optional ahead-of-time build of the native extension (needs torch in the build
environment, hence --no-build-isolation):
    AIA_KERNELS_BUILD_NATIVE=1 pip install --no-build-isolation -e .
builds aia_kernels/native/_aia_native*.so from the same sources and flags as the
first-use build (aia_kernels/native/build_config.py), with the CUDA kernels when torch
has CUDA and a CUDA toolkit is present (AIA_KERNELS_BUILD_NATIVE=cpu: never), and records what it was built for in
_aia_native.json; the loader uses it only for that torch version, those sources (a
later edit of csrc/ builds on first use again) and, with the default -march=native, CPU.
"""
import importlib.util
import json
import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithSources(build_py):
    """Ship the C++/CUDA sources with the package, for the first-use build."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "aia_kernels" / "csrc"
        shutil.copytree(ROOT / "csrc", target, dirs_exist_ok=True)


def build_config():
    """aia_kernels/native/build_config.py, read by path (importing the package needs torch & co.)."""
    spec = importlib.util.spec_from_file_location("aia_build_config", ROOT / "aia_kernels/native/build_config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def native_extension():
    """(ext_modules, build_ext command) of the ahead-of-time build, if AIA_KERNELS_BUILD_NATIVE is 1 or cpu."""
    setting = os.environ.get("AIA_KERNELS_BUILD_NATIVE", "")
    if setting not in ("1", "cpu"):
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cfg = build_config()
    cuda = setting == "1" and torch.version.cuda is not None and CUDA_HOME is not None
    sources = [f"csrc/{s}" for s in cfg.CPU_SOURCES + (cfg.CUDA_SOURCES if cuda else ())]
    defines = cfg.CUDA_FLAGS if cuda else []
    kind = CUDAExtension if cuda else CppExtension
    # -g0: Python's own CFLAGS carry -g; debug info doubles the build time and the file size.
    extension = kind(cfg.PREBUILT_MODULE, sources, include_dirs=[str(ROOT / "csrc")],
                     extra_compile_args={"cxx": cfg.CXX_FLAGS + defines + ["-g0"], "nvcc": cfg.NVCC_FLAGS + defines},
                     extra_link_args=cfg.LD_FLAGS)

    class BuildNative(BuildExtension):
        """Builds the library, then records beside it what the loader must check."""

        def run(self):
            super().run()
            library = Path(self.get_ext_fullpath(cfg.PREBUILT_MODULE))
            meta = {"torch": torch.__version__, "cuda": cuda, "cxx_flags": cfg.CXX_FLAGS,
                    "cpu": cfg.cpu_fingerprint() if cfg.machine_specific(cfg.CXX_FLAGS) else None,
                    "sources": cfg.sources_digest(ROOT / "csrc")}
            library.with_name(cfg.PREBUILT_METADATA).write_text(json.dumps(meta, indent=1) + "\n")

    return [extension], {"build_ext": BuildNative}


ext_modules, build_ext_command = native_extension()

# Metadata, dependencies, extras and package data: pyproject.toml.
setup(ext_modules=ext_modules, cmdclass={"build_py": BuildPyWithSources, **build_ext_command})
