"""A 3D ResNet (I3D / SlowFast's slow pathway) with AIA on its 5-D features.

    from aia_kernels.models import i3d_resnet50
    model = i3d_resnet50(num_classes=400, variant="CinST->STinC")
    scores = model(clips)          # clips: (N, 3, T, H, W) -> (N, num_classes)

The network is PySlowFast's ResNet-50 in two forms (``arch``):

* ``"i3d"``: stem Conv3d 5x7x7 (temporal stride 1), max-pool 1x3x3 stride (1, 2, 2),
  a temporal max-pool of stride 2 after ``layer1`` (T halves there), and the
  Bottlenecks' first convs inflated to 3x1x1 in every block of ``layer1``, in every
  other block of ``layer2`` and ``layer3`` (the first included) and in every other
  block of ``layer4`` (the second included); elsewhere 1x1x1;
* ``"slow"`` (the slow pathway, "Slow-only"): stem 1x7x7, no temporal pooling, 3x1x1
  first convs in every block of ``layer3`` and ``layer4`` only.

In both, the Bottlenecks' second convs are 1x3x3 (the spatial stride is there) and no
layer strides in time, so T changes only at the temporal pool. AIA sits after each
Bottleneck's ``bn2`` as in the 2D networks (``eft``, or ``eft1``/``eft2``; the same
placement rule), on the (N, C, T, H, W) features in whatever memory format they are
(contiguous or ``channels_last_3d``), with T read from the tensor at each block.
"""
from __future__ import annotations

import torch
from torch import nn

from ..modules import AIAModule, aia_modules
from ..state_loading import AtomicLoadStateDict
from .resnet import Bottleneck, blocks_with_aia, init_weights

ARCHS = ("i3d", "slow")
# Temporal kernel size of the Bottlenecks' first conv, per stage: a list cycles over its blocks.
TEMPORAL_KERNELS = {"i3d": ([3], [3, 1], [3, 1], [1, 3]), "slow": ([1], [1], [3], [3])}
STEM_TEMPORAL_KERNEL = {"i3d": 5, "slow": 1}
# Stride in time of the max-pool after layer1 (1: none).
TEMPORAL_POOL = {"i3d": 2, "slow": 1}


class Bottleneck3d(Bottleneck):
    """The 2D :class:`~aia_kernels.models.resnet.Bottleneck` with Conv3d layers: first conv
    ``temporal_kernel`` x1x1, second 1x3x3 with the spatial stride, AIA after ``bn2`` on
    5-D input (T from each tensor)."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 variant: str | None = None, temporal_kernel: int = 1, backend: str = "auto",
                 recompute: bool = True):
        nn.Module.__init__(self)
        self.num_segments, self.shift, self.fold_div = None, False, 8
        self.conv1 = nn.Conv3d(inplanes, planes, (temporal_kernel, 1, 1), padding=(temporal_kernel // 2, 0, 0),
                               bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = nn.Conv3d(planes, planes, (1, 3, 3), stride=(1, stride, stride), padding=(0, 1, 1), bias=False)
        self.bn2 = nn.BatchNorm3d(planes)
        self.conv3 = nn.Conv3d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        # 5-D input only, T from each tensor
        self._attach_attention(variant, backend=backend, layout="NCTHW", recompute=recompute)


class ResNet3d(AtomicLoadStateDict, nn.Module):
    """A 3D ResNet of :class:`Bottleneck3d` in one of ``ARCHS``, with AIA placed by the 2D
    networks' rule (every block; every other block of a stage of 23 or more).

    ``layers`` blocks per stage and ``widths`` their planes (ResNet-50: (3, 4, 6, 3) and
    (64, 128, 256, 512); smaller for toy networks). Input (N, 3, T, H, W)."""

    def __init__(self, layers=(3, 4, 6, 3), widths=(64, 128, 256, 512), num_classes: int = 400,
                 variant: str | None = None, arch: str = "i3d", backend: str = "auto",
                 stem_width: int | None = None, dropout: float = 0.5, recompute: bool = True):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown 3D ResNet arch {arch!r}; expected one of {ARCHS}")
        self.arch = arch
        self.inplanes = stem_width or widths[0]
        kt = STEM_TEMPORAL_KERNEL[arch]
        self.conv1 = nn.Conv3d(3, self.inplanes, (kt, 7, 7), stride=(1, 2, 2), padding=(kt // 2, 3, 3), bias=False)
        self.bn1 = nn.BatchNorm3d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
        pool = TEMPORAL_POOL[arch]
        self.temporal_pool = nn.MaxPool3d((pool, 1, 1), stride=(pool, 1, 1)) if pool > 1 else nn.Identity()
        for i, (blocks, width) in enumerate(zip(layers, widths)):
            self.add_module(f"layer{i + 1}", self._make_layer(width, blocks, 1 if i == 0 else 2, variant, backend,
                                                              TEMPORAL_KERNELS[arch][i], recompute))
        self.avgpool = nn.AdaptiveAvgPool3d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(widths[len(layers) - 1] * Bottleneck3d.expansion, num_classes)
        self._init_weights()

    def _make_layer(self, planes, blocks, stride, variant, backend, temporal_kernels, recompute) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck3d.expansion:
            downsample = nn.Sequential(
                nn.Conv3d(self.inplanes, planes * Bottleneck3d.expansion, 1, stride=(1, stride, stride), bias=False),
                nn.BatchNorm3d(planes * Bottleneck3d.expansion))
        layers = []
        for i, carries in enumerate(blocks_with_aia(blocks)):
            layers.append(Bottleneck3d(self.inplanes, planes, stride if i == 0 else 1, downsample if i == 0 else None,
                                       variant=variant if carries else None,
                                       temporal_kernel=temporal_kernels[i % len(temporal_kernels)], backend=backend,
                                       recompute=recompute))
            self.inplanes = planes * Bottleneck3d.expansion
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        """Kaiming for the network's convs, BN weight 1 and bias 0; the AIA gates keep their own."""
        aia_parts = {id(m) for a in self.aia_modules() for m in a.modules()}
        init_weights((m for m in self.modules() if id(m) not in aia_parts), nn.Conv3d, nn.BatchNorm3d)

    def aia_modules(self) -> list[AIAModule]:
        return [m for _, m in aia_modules(self)]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5 or x.shape[1] != 3:
            raise ValueError(f"a 3D ResNet takes clips of shape (N, 3, T, H, W), got {tuple(x.shape)}")
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.temporal_pool(x)
        for i in range(2, 5):
            layer = getattr(self, f"layer{i}", None)
            if layer is not None:
                x = layer(x)
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.features(x)))


def i3d_resnet50(num_classes: int = 400, variant: str | None = None, arch: str = "i3d", backend: str = "auto",
                 dropout: float = 0.5, recompute: bool = True) -> ResNet3d:
    """I3D ResNet-50 (``arch="i3d"``) or SlowFast's slow pathway (``arch="slow"``) with AIA
    ``variant`` (None: the plain network). Input (N, 3, T, H, W); for channels_last_3d,
    ``model.to(memory_format=torch.channels_last_3d)`` and the clips likewise."""
    return ResNet3d((3, 4, 6, 3), (64, 128, 256, 512), num_classes, variant, arch, backend, dropout=dropout,
                    recompute=recompute)
