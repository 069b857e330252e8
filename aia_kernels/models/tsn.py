"""TSN and TSM networks over the AIA ResNet, laid out like the authors' training code.

``TSN.base_model`` is the ResNet with its ``fc`` replaced by a Dropout and a
``new_fc`` for the classes (with ``dropout == 0``: ``base_model.fc`` becomes the
classifier and there is no ``new_fc``), so ``TSN.state_dict()`` keys are the
authors' keys without DataParallel's ``module.`` prefix.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from ..state_loading import AtomicLoadStateDict
from .checkpoint import load_state_dict_checked, read_state_dict
from .resnet import ResNet

RESNET_LAYERS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}


class TSN(AtomicLoadStateDict, nn.Module):
    """Frame-level 2D network over every frame; the clip's score is the mean of its frame scores.

    Input ``(N, T, 3, H, W)`` or ``(N*T, 3, H, W)`` (then ``T = num_segments``);
    output ``(N, num_classes)``.
    """

    def __init__(self, base_model: ResNet, num_classes: int, num_segments: int = 8, dropout: float = 0.5):
        super().__init__()
        self.num_segments, self.dropout = num_segments, dropout
        self.base_model = base_model
        feature_dim = base_model.fc.in_features
        if dropout > 0:
            base_model.fc = nn.Dropout(p=dropout)
            self.new_fc = nn.Linear(feature_dim, num_classes)
            classifier = self.new_fc
        else:
            base_model.fc = nn.Linear(feature_dim, num_classes)
            self.new_fc = None
            classifier = base_model.fc
        nn.init.normal_(classifier.weight, 0, 0.001)  # the authors' TSN initialisation
        nn.init.zeros_(classifier.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 5:
            n, t = x.shape[:2]
            x = x.reshape(n * t, *x.shape[2:])
        elif x.dim() == 4:
            t = self.num_segments
            if x.shape[0] % t:
                raise ValueError(f"batch of {x.shape[0]} frames is not a whole number of {t}-frame clips")
        else:
            raise ValueError(f"expected (N, T, 3, H, W) or (N*T, 3, H, W), got shape {tuple(x.shape)}")
        scores = self.base_model(x)
        if self.new_fc is not None:
            scores = self.new_fc(scores)
        return scores.view(-1, t, scores.shape[-1]).mean(dim=1)


def load_imagenet(model: TSN, path_or_state_dict) -> None:
    """ImageNet weights of a torchvision-format ResNet state_dict into ``model.base_model``.

    Its ``fc`` is dropped (TSN replaces it); AIA parameters keep their initialisation;
    every other key must match (strict, with a report of any mismatch).
    """
    state = {k: v for k, v in read_state_dict(path_or_state_dict).items() if not k.startswith("fc.")}
    expected = [k for k in model.base_model.state_dict() if ".eft" not in k and not k.startswith("fc.")]
    load_state_dict_checked(model.base_model, state, expected_keys=expected)


def _builder(name: str, arch: str, shift: bool, doc: str):
    def build(num_classes: int, num_segments: int = 8, variant: str | None = "CinST->STinC",
              backend: str = "auto", dropout: float = 0.5, pretrained: str | os.PathLike | dict | None = None,
              recompute: bool = True) -> TSN:
        base = ResNet(RESNET_LAYERS[arch], variant=variant, num_segments=num_segments, backend=backend, shift=shift,
                      recompute=recompute)
        model = TSN(base, num_classes, num_segments, dropout)
        if pretrained is not None:
            load_imagenet(model, pretrained)
        return model
    build.__name__ = build.__qualname__ = name
    build.__doc__ = doc + """

    ``variant=None`` gives the plain backbone; ``pretrained``: a local torchvision-format
    ImageNet state_dict (path or dict) for the ResNet (no download)."""
    return build


tsn_resnet50 = _builder("tsn_resnet50", "resnet50", False, "TSN-ResNet-50 with AIA ``variant`` in every Bottleneck.")
tsn_resnet101 = _builder("tsn_resnet101", "resnet101", False,
                         "TSN-ResNet-101; its 23-block stage carries AIA in every other block.")
tsm_resnet50 = _builder("tsm_resnet50", "resnet50", True,
                        "TSM-ResNet-50: TSN plus the temporal shift in the blocks that carry AIA.")
tsm_resnet101 = _builder("tsm_resnet101", "resnet101", True, "TSM-ResNet-101.")
