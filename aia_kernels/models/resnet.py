"""A torchvision-layout ResNet whose Bottlenecks carry AIA (and optionally TSM's shift).

Keys match torchvision's ResNet (``conv1``, ``bn1``, ``layer1.0.conv1``, ...,
``layer1.0.downsample.0``, ``fc``) plus the AIA unit(s) of a Bottleneck: ``eft``
for a single unit, ``eft1``/``eft2`` for a combined variant (docs/semantics.md,
"Use in a TSN / TSM network"). No torchvision is needed.
"""
from __future__ import annotations

import torch
from torch import nn

from ..modules import AIACombined, AIAModule, aia_modules, build, swap_unit_states, warn_old_unit_order
from ..state_loading import AtomicLoadStateDict
from ..variants import REGISTRATION_ORDER

# A stage with this many blocks or more (ResNet-101's third stage) carries AIA (and
# the shift) in every other block only, the first included.
SPARSE_STAGE_BLOCKS = 23


def blocks_with_aia(num_blocks: int) -> list[bool]:
    """Which blocks of a stage carry AIA (spec: every block; in a stage of >= 23, i % 2 == 0)."""
    step = 2 if num_blocks >= SPARSE_STAGE_BLOCKS else 1
    return [i % step == 0 for i in range(num_blocks)]


def init_weights(modules, conv_type: type, norm_type: type) -> None:
    """torchvision's ResNet initialisation: Kaiming normal (fan_out) for ``conv_type``,
    weight 1 and bias 0 for ``norm_type``."""
    for m in modules:
        if isinstance(m, conv_type):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, norm_type):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def temporal_shift(x: torch.Tensor, num_segments: int, fold_div: int = 8) -> torch.Tensor:
    """TSM's shift on ``(N*T, C, H, W)``: channels ``[0, C/fold_div)`` take frame t+1's
    values, ``[C/fold_div, 2C/fold_div)`` frame t-1's, zeros at the clip's ends."""
    nt, c, h, w = x.shape
    v = x.view(nt // num_segments, num_segments, c, h, w)
    fold = c // fold_div
    out = torch.zeros_like(v)
    out[:, :-1, :fold] = v[:, 1:, :fold]
    out[:, 1:, fold:2 * fold] = v[:, :-1, fold:2 * fold]
    out[:, :, 2 * fold:] = v[:, :, 2 * fold:]
    return out.view(x.shape)


def _load_old_unit_order(block: "Bottleneck", incompatible_keys) -> None:
    """Load post-hook of a block with a ``CinST+STinC`` unit pair: a checkpoint saved by
    aia_kernels 0.1 held the units under the block's ``aia`` module, with eft1 = CinST. Its
    metadata then has an entry for the block (version 1) but none for ``eft1``/``eft2`` at the
    block's level (the authors' checkpoints have both), so the loaded unit states are swapped."""
    version = block.__dict__.pop("_checkpoint_version", None)
    units = (block.eft1, block.eft2)
    unit_versions = [u.__dict__.pop("_checkpoint_version", None) for u in units]
    if version is not None and version < Bottleneck._version and unit_versions == [None, None]:
        swap_unit_states(*units)
        warn_old_unit_order(block.attention.variant)


class Bottleneck(nn.Module):
    """torchvision's Bottleneck (stride on the 3x3 conv) with AIA after ``bn2``.

    A single unit is the child ``eft``; a combined variant's units are the children ``eft1``
    and ``eft2``, so parameter, module and state_dict names are the authors'
    (``layer1.0.eft1.C_conv.weight``). The combined module that runs them as one fused op
    holds those same units and is not a child (``attention`` returns it).
    """

    expansion = 4
    # 2: a combined variant's units are the children eft1/eft2 in the spec's order. 1
    # (aia_kernels 0.1): they were saved from a child ``aia``, CinST+STinC with eft1 = CinST.
    _version = 2

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 variant: str | None = None, num_segments: int = 8, backend: str = "auto",
                 shift: bool = False, fold_div: int = 8, recompute: bool = True):
        super().__init__()
        self.num_segments, self.shift, self.fold_div = num_segments, shift, fold_div
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self._attach_attention(variant, num_segments=num_segments, backend=backend, recompute=recompute)

    def _attach_attention(self, variant: str | None, **build_kwargs) -> None:
        """AIA after bn2: the unit ``eft``, or a combined variant's units ``eft1``/``eft2``."""
        self._combined = None
        if variant is None:
            return
        aia = build(variant, **build_kwargs)
        if isinstance(aia, AIACombined):
            self.eft1, self.eft2 = aia.eft1, aia.eft2
            self.__dict__["_combined"] = aia  # not a child: names stay the authors' eft1.*/eft2.*
            if aia.variant in REGISTRATION_ORDER:
                self.register_load_state_dict_post_hook(_load_old_unit_order)
        else:
            self.eft = aia

    @property
    def attention(self) -> AIAModule | None:
        """The block's AIA module: the unit ``eft``, the combined module over ``eft1``/``eft2``, or None."""
        return self._modules.get("eft") or self._combined

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args) -> None:
        # Read by _load_old_unit_order once the units are loaded.
        self.__dict__["_checkpoint_version"] = local_metadata.get("version")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = temporal_shift(x, self.num_segments, self.fold_div) if self.shift else x
        out = self.relu(self.bn1(self.conv1(out)))
        out = self.bn2(self.conv2(out))
        attention = self.attention
        if attention is not None:
            out = attention(out)
        out = self.relu(out)
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(AtomicLoadStateDict, nn.Module):
    """torchvision's ResNet of Bottlenecks, with AIA placed by the spec's rule.

    ``layers`` blocks per stage, ``widths`` the Bottleneck planes per stage (64, 128,
    256, 512 for ResNet-50/101; smaller for toy networks). ``shift`` adds TSM's
    temporal shift to the blocks that carry AIA (by the same placement rule when
    ``variant`` is None).
    """

    def __init__(self, layers=(3, 4, 6, 3), widths=(64, 128, 256, 512), num_classes: int = 1000,
                 variant: str | None = None, num_segments: int = 8, backend: str = "auto",
                 shift: bool = False, stem_width: int | None = None, recompute: bool = True):
        super().__init__()
        self.num_segments = num_segments
        self.inplanes = stem_width or widths[0]
        self.conv1 = nn.Conv2d(3, self.inplanes, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        opts = dict(variant=variant, num_segments=num_segments, backend=backend, shift=shift, recompute=recompute)
        for i, (blocks, width) in enumerate(zip(layers, widths)):
            self.add_module(f"layer{i + 1}", self._make_layer(width, blocks, 1 if i == 0 else 2, **opts))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1] * Bottleneck.expansion, num_classes)
        self._init_weights()

    def _make_layer(self, planes, blocks, stride, variant, shift, **kw) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * Bottleneck.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * Bottleneck.expansion))
        layers = []
        for i, carries in enumerate(blocks_with_aia(blocks)):
            layers.append(Bottleneck(self.inplanes, planes, stride if i == 0 else 1,
                                     downsample if i == 0 else None,
                                     variant=variant if carries else None, shift=shift and carries, **kw))
            self.inplanes = planes * Bottleneck.expansion
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        """torchvision's initialisation of the 2D layers (AIA keeps its own)."""
        init_weights(self.modules(), nn.Conv2d, nn.BatchNorm2d)

    def aia_modules(self) -> list[AIAModule]:
        return [m for _, m in aia_modules(self)]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(1, 5):
            layer = getattr(self, f"layer{i}", None)
            if layer is not None:
                x = layer(x)
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))
