"""Can the network tell which way an object moves? The paper's central claim, on CPU in minutes.

    python -m aia_kernels.experiments.temporal_order [--epochs 12] [--network tsn|i3d|slow] [--out DIR]

A synthetic video task whose two classes differ only in temporal order: a bright
square crosses the frame left-to-right (class 0) or right-to-left (class 1) among
static distractor squares and per-frame noise. Every class-1 clip is a class-0 clip
played backwards (noise included), so the *set* of frames of a clip carries no
information about its class: a TSN, which scores frames independently and averages
the scores, is exactly invariant to frame order and must stay at chance. The same
small TSN with AIA in its Bottlenecks (placed as in ResNet-50: after bn2, before its
ReLU) sees across frames through the gates' 3D convolutions and can learn the task.

``--network i3d`` / ``slow`` run the same comparison on a small 3D ResNet
(``models.ResNet3d``) with AIA on its 5-D features: in the I3D form its stem and
inflated Bottleneck convs see across frames by themselves; in the slow pathway's form
its first two stages (all this small one has) have no temporal conv, like a TSN.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import time

import torch
from torch import nn

from ..models import TSN, ResNet, ResNet3d

T, SIZE, SQUARE, SPEED = 8, 32, 4, 3
DEFAULT_VARIANTS = ("plain", "C", "CinST->STinC")
NETWORKS = ("tsn", "i3d", "slow")
NETWORK_NAMES = {"tsn": "TSN", "i3d": "I3D", "slow": "Slow"}
RESULTS_DIR = os.path.join(os.path.dirname(__file__), "results")


def make_clips(n: int, seed: int, frames: int = T, size: int = SIZE, distractors: int = 3,
               noise: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` clips ``(n, frames, 3, size, size)`` and their labels (0: moves right, 1: moves left)."""
    g = torch.Generator().manual_seed(seed)
    clips = torch.zeros(n, frames, 3, size, size)
    travel = SPEED * (frames - 1)
    for i in range(n):
        for _ in range(distractors):  # static squares, in every frame
            y, x = torch.randint(0, size - SQUARE + 1, (2,), generator=g).tolist()
            clips[i, :, :, y:y + SQUARE, x:x + SQUARE] = torch.rand(3, 1, 1, generator=g) + 0.2
        y = int(torch.randint(0, size - SQUARE + 1, (1,), generator=g))
        x0 = int(torch.randint(0, size - SQUARE - travel + 1, (1,), generator=g))
        color = torch.rand(3, 1, 1, generator=g) + 0.2
        for t in range(frames):
            x = x0 + SPEED * t
            clips[i, t, :, y:y + SQUARE, x:x + SQUARE] = color
    clips += noise * torch.randn(clips.shape, generator=g)
    labels = torch.randperm(n, generator=g) % 2  # balanced: a constant guess scores exactly 0.5
    clips[labels == 1] = clips[labels == 1].flip(1)  # the same frames, played backwards
    return clips, labels


class FramesAsConv3dInput(nn.Module):
    """A 3D network on the task's (N, T, 3, H, W) clips: it reads their (N, 3, T, H, W) view."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        return self.net(clips.transpose(1, 2))


def build_model(variant: str, frames: int = T, backend: str = "auto", network: str = "tsn") -> nn.Module:
    """A small TSN (``network="tsn"``): ResNet stem and two stages of one Bottleneck each
    (widths 8, 16); or a 3D ResNet of the same sizes (``models.ResNet3d``) in the I3D form
    (``"i3d"``: temporal convs in the stem and Bottlenecks) or the slow pathway's
    (``"slow"``: its first two stages have none, so this small one sees frames apart)."""
    aia = None if variant == "plain" else variant
    if network in ("i3d", "slow"):
        return FramesAsConv3dInput(ResNet3d(layers=(1, 1), widths=(8, 16), num_classes=2, variant=aia, arch=network,
                                            backend=backend, stem_width=16, dropout=0.0))
    if network != "tsn":
        raise ValueError(f"unknown network {network!r}; expected one of {NETWORKS}")
    base = ResNet(layers=(1, 1), widths=(8, 16), variant=aia, num_segments=frames, backend=backend, stem_width=16)
    return TSN(base, num_classes=2, num_segments=frames, dropout=0.0)


@torch.no_grad()
def accuracy(model: nn.Module, clips: torch.Tensor, labels: torch.Tensor, batch: int = 100) -> float:
    model.eval()
    correct = sum((model(clips[i:i + batch]).argmax(1) == labels[i:i + batch]).sum().item()
                  for i in range(0, len(clips), batch))
    return correct / len(clips)


def train(variant: str, data, epochs: int, seed: int, batch: int = 32, lr: float = 3e-3,
          backend: str = "auto", log=print, network: str = "tsn") -> dict:
    (train_x, train_y), (test_x, test_y) = data
    torch.manual_seed(seed)
    model = build_model(variant, train_x.shape[1], backend, network)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * (len(train_x) // batch))
    history = {"epoch": [], "train_loss": [], "train_acc": [], "test_acc": []}
    start = time.time()
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(train_x))
        losses = []
        for i in range(0, len(train_x) - batch + 1, batch):
            idx = order[i:i + batch]
            loss = nn.functional.cross_entropy(model(train_x[idx]), train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        history["epoch"].append(epoch)
        history["train_loss"].append(sum(losses) / len(losses))
        history["train_acc"].append(accuracy(model, train_x[:1000], train_y[:1000]))
        history["test_acc"].append(accuracy(model, test_x, test_y))
        log(f"{variant:>14} epoch {epoch:3d}  loss {history['train_loss'][-1]:.4f}  "
            f"train acc {history['train_acc'][-1]:.3f}  held-out acc {history['test_acc'][-1]:.3f}  "
            f"({time.time() - start:.0f}s)")
    params = sum(p.numel() for p in model.parameters())
    return {"network": network, "variant": variant, "params": params, "test_acc": history["test_acc"][-1],
            "seconds": round(time.time() - start, 1), "history": history}


def plot(results: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    for r in results:
        h = r["history"]
        ax_loss.plot(h["epoch"], h["train_loss"], label=r["variant"])
        ax_acc.plot(h["epoch"], h["test_acc"], marker="o", ms=3, label=r["variant"])
    ax_acc.axhline(0.5, color="gray", ls="--", lw=1, label="chance")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="training loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="held-out accuracy (left vs right motion)", ylim=(0, 1.02))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run(epochs: int = 12, train_size: int = 2000, test_size: int = 1000, seed: int = 0,
        variants=DEFAULT_VARIANTS, backend: str = "auto", log=print, network: str = "tsn") -> list[dict]:
    data = make_clips(train_size, seed=seed + 1), make_clips(test_size, seed=seed + 2)
    return [train(v, data, epochs, seed, backend=backend, log=log, network=network) for v in variants]


def write(results: list[dict], out: str, command: str, args: dict) -> None:
    os.makedirs(out, exist_ok=True)
    meta = {"command": command, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "args": args}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({**meta, "results": results}, f, indent=1)
    lines = [f"Command: `{command}`  ", f"Date: {meta['date']}, torch {meta['torch']}, "
             f"{meta['threads']} CPU threads, seed {args['seed']}, {args['train_size']} training / "
             f"{args['test_size']} held-out clips, {args['epochs']} epochs", "",
             "| model | parameters | held-out accuracy | best epoch's held-out accuracy | training time |",
             "|---|---:|---:|---:|---:|"]
    for r in results:
        net = NETWORK_NAMES[r.get("network", "tsn")]
        lines.append(f"| {net} {'+ AIA ' + r['variant'] if r['variant'] != 'plain' else '(plain)'} | {r['params']:,} "
                     f"| {r['test_acc']:.3f} | {max(r['history']['test_acc']):.3f} | {r['seconds']:.0f} s |")
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plot(results, os.path.join(out, "training_curves.png"))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="TSN with and without AIA on a temporal-order task")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--test-size", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS))
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--network", choices=NETWORKS, default="tsn",
                        help="tsn: the 2D network; i3d, slow: a 3D ResNet of the same sizes in that form "
                             "(AIA on 5-D features)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 is fastest for these tiny tensors)")
    parser.add_argument("--out", default=None, help="where results.json/.md and the PNG go (default: "
                        "aia_kernels/experiments/results/, and its i3d/ or slow/ for those networks)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = run(args.epochs, args.train_size, args.test_size, args.seed, args.variants, args.backend,
                  network=args.network)
    command = "python -m aia_kernels.experiments.temporal_order " + " ".join(argv if argv is not None else
                                                                           __import__("sys").argv[1:])
    out = args.out or (RESULTS_DIR if args.network == "tsn" else os.path.join(RESULTS_DIR, args.network))
    write(results, out, command.strip(), vars(args))
    for r in results:
        print(f"{r['variant']:>14}: held-out accuracy {r['test_acc']:.3f}")


if __name__ == "__main__":
    main()
