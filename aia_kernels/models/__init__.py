"""TSN / TSM ResNets with AIA, laid out so the authors' checkpoints load.

    from aia_kernels.models import tsn_resnet50, load_checkpoint
    model = tsn_resnet50(num_classes=174, num_segments=8, variant="CinST->STinC")
    load_checkpoint(model, "TSN_something_RGB_resnet50_aia_segment8_best.pth.tar")
    scores = model(clips)          # clips: (N, T, 3, H, W) -> (N, num_classes)

3D networks (I3D / SlowFast's slow pathway) with AIA on 5-D features: ``i3d_resnet50``.
"""
from .checkpoint import CheckpointMismatch, CheckpointReadError, LoadReport, load_checkpoint
from .distributed import SyncBatchNorm, convert_sync_batchnorm
from .i3d import Bottleneck3d, ResNet3d, i3d_resnet50
from .resnet import Bottleneck, ResNet, blocks_with_aia, temporal_shift
from .tsn import TSN, tsm_resnet50, tsm_resnet101, tsn_resnet50, tsn_resnet101

__all__ = ["TSN", "ResNet", "Bottleneck", "tsn_resnet50", "tsn_resnet101", "tsm_resnet50", "tsm_resnet101",
           "load_checkpoint", "LoadReport", "CheckpointMismatch", "CheckpointReadError", "blocks_with_aia",
           "temporal_shift", "SyncBatchNorm", "convert_sync_batchnorm", "i3d_resnet50", "ResNet3d", "Bottleneck3d"]
