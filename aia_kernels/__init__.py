"""Fused kernels for Attention-in-Attention (AIA) video modules.

    import aia_kernels
    aia = aia_kernels.build("CinST->STinC", num_segments=8)   # an nn.Module
    y = aia(x)                                                # x: (N*T, C, H, W)
    aia.last_backend                                          # which backend ran
"""
from .backends import BACKENDS
from .convert import convert
from .modules import ST, AIACombined, AIAModule, AIAUnit, C, CinST, STinC, aia_modules, build
from .variants import VARIANTS

__all__ = ["VARIANTS", "BACKENDS", "build", "C", "ST", "CinST", "STinC",
           "AIAModule", "AIAUnit", "AIACombined", "aia_modules", "convert"]
__version__ = "0.2.0"
