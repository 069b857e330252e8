"""Export a TSN / TSM network with AIA to ONNX and check it against PyTorch.

    python -m aia_kernels.export --arch tsm_resnet50 --variant "CinST->STinC" \\
        --num-classes 174 --checkpoint FILE --out model.onnx

The checkpoint is the authors' (``{"state_dict": {"module.base_model...."}}``) or one
saved from this package's models; without one the weights are random (with a warning).
The model is exported in eval mode with a dynamic batch size (clips of ``--num-segments``
frames of ``--resolution`` pixels), then run by ONNX Runtime on the CPU on a random clip
and compared with PyTorch. Needs the ``export`` extras (onnx, onnxscript, onnxruntime).
docs/deploy.md has the details.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch

from .models import load_checkpoint, tsm_resnet50, tsm_resnet101, tsn_resnet50, tsn_resnet101
from .models.checkpoint import read_state_dict
from .variants import VARIANTS

ARCHS = {f.__name__: f for f in (tsn_resnet50, tsn_resnet101, tsm_resnet50, tsm_resnet101)}
# ONNX Runtime against PyTorch, both float32: the largest difference relative to the largest score.
RELATIVE_TOLERANCE = 1e-4


def build_model(arch: str, variant: str | None, num_classes: int, num_segments: int,
                checkpoint: str | os.PathLike | None) -> torch.nn.Module:
    """The network in eval mode, with the checkpoint's weights or random ones (and a warning).
    A checkpoint without ``new_fc`` was trained without dropout: its classifier is ``base_model.fc``."""
    state = None if checkpoint is None else read_state_dict(checkpoint)
    dropout = 0.5 if state is None or any(k.startswith("new_fc.") for k in state) else 0.0
    model = ARCHS[arch](num_classes, num_segments=num_segments, variant=variant, dropout=dropout)
    if state is None:
        warnings.warn("aia_kernels.export: no --checkpoint given, so the exported model has random weights",
                      UserWarning, stacklevel=2)
    else:
        load_checkpoint(model, state)
    return model.eval()


def export_onnx(model: torch.nn.Module, path: str | os.PathLike, num_segments: int, resolution: int) -> None:
    """``model`` (eval mode) to ONNX at ``path``: input ``clips`` (batch, T, 3, H, W) with a
    dynamic batch, output ``scores`` (batch, classes)."""
    example = torch.randn(2, num_segments, 3, resolution, resolution)  # 2: a batch of 1 would be specialised
    program = torch.onnx.export(model, (example,), dynamo=True, input_names=["clips"], output_names=["scores"],
                                dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
    program.save(str(path))


def compare_with_onnxruntime(model: torch.nn.Module, path: str | os.PathLike, clips: torch.Tensor
                             ) -> tuple[float, float]:
    """(largest absolute difference, that relative to the largest PyTorch score) between
    ONNX Runtime (CPU) running ``path`` and ``model`` on ``clips``."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (scores,) = session.run(None, {session.get_inputs()[0].name: clips.numpy()})
    with torch.no_grad():
        expected = model(clips)
    diff = (torch.from_numpy(scores) - expected).abs().max().item()
    return diff, diff / max(expected.abs().max().item(), 1e-30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aia_kernels.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", required=True, choices=sorted(ARCHS))
    parser.add_argument("--variant", required=True, choices=[*VARIANTS, "none"],
                        help="the AIA variant; 'none' for the plain backbone (quote it: 'CinST->STinC')")
    parser.add_argument("--num-classes", type=int, required=True)
    parser.add_argument("--num-segments", type=int, default=8, help="frames per clip (default 8)")
    parser.add_argument("--resolution", type=int, default=224, help="frame height and width (default 224)")
    parser.add_argument("--checkpoint", help="the authors' checkpoint or a state_dict of this package's model")
    parser.add_argument("--out", required=True, help="the ONNX file to write")
    args = parser.parse_args(argv)
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        parser.error(f"{exc.name} is not installed; pip install 'aia_kernels[export]' (onnx, onnxscript, "
                     f"onnxruntime)")

    variant = None if args.variant == "none" else args.variant
    model = build_model(args.arch, variant, args.num_classes, args.num_segments, args.checkpoint)
    export_onnx(model, args.out, args.num_segments, args.resolution)
    clip = torch.randn(1, args.num_segments, 3, args.resolution, args.resolution)
    diff, relative = compare_with_onnxruntime(model, args.out, clip)
    size = os.path.getsize(args.out)
    print(f"wrote {args.out}: {size / 2**20:.1f} MiB ({size} bytes)")
    print(f"ONNX Runtime (CPU) vs PyTorch on a random clip {tuple(clip.shape)}: max abs difference {diff:.3g}, "
          f"{relative:.3g} of the largest score (tolerance {RELATIVE_TOLERANCE:g})")
    if not relative <= RELATIVE_TOLERANCE:
        print("error: the exported model does not match PyTorch", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
