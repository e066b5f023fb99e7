"""Dense prediction with the hierarchical side network: semantic segmentation of generated scenes.

A frozen, ImageNet-pretrained EfficientNet-Lite0 (its weights ship in a package) segments
images of discs, squares and triangles in random colours on smooth random backgrounds: the
class of a pixel is the shape it belongs to, so colour does not give it away. Three ways to
train the same feature-pyramid segmentation head (:class:`SegHead`) on top:

- ``head``: the frozen backbone's stage outputs at strides 4, 8, 16 and 32, no gradient into
  the backbone; only the head trains.
- ``bias``: the same stage outputs, with the backbone's biases trained by S2A (4-bit codes);
  the bias-only baseline.
- ``side``: ``S2AConfig(modules=["side"], side="hierarchical", side_strides=(4, 8, 16, 32))``:
  the backbone runs without autograd and stores nothing; the side network's pyramid feeds the
  head.

Each method's learning rate is picked from ``--lrs`` on a validation set; the table reports
mean IoU on a separate test set (all three sets generated with their own seeds). "kept by S2A"
is what the S2A engine kept for backward in one batch: the backbone's for ``bias``, the side
network's for ``side`` (the backbone keeps nothing there); ``head`` applies no S2A and its
frozen backbone runs without autograd. The head's own saved tensors are not counted::

    uv run python examples/segmentation.py --out seg_results.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_s2a import apply_s2a
from lightning_s2a.lightning.data import IMAGENET_MEAN, IMAGENET_STD
from lightning_s2a.pretrained import efficientnet_lite0_imagenet

CLASSES = ("background", "disc", "square", "triangle")
#: Lite0 blocks that end at strides 4, 8, 16 and 32 (the baseline's taps).
STAGE_ENDS = ("blocks.1", "blocks.2", "blocks.4", "blocks.6")
STRIDES = (4, 8, 16, 32)


# -- data ---------------------------------------------------------------------------------
def make_scenes(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` RGB scenes in [0, 1] and their masks: 1 to 3 shapes each, later ones on top."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")

    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * torch.rand((), generator=g).item()

    images = torch.empty(n, 3, size, size)
    masks = torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):
        low = torch.rand(1, 3, 4, 4, generator=g)
        images[i] = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)[0]
        for _ in range(int(torch.randint(1, 4, (), generator=g))):
            cls = int(torch.randint(1, len(CLASSES), (), generator=g))
            r = uniform(0.1 * size, 0.22 * size)
            cx, cy = uniform(r, size - r), uniform(r, size - r)
            if CLASSES[cls] == "disc":
                inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= r**2
            elif CLASSES[cls] == "square":
                inside = ((xx - cx).abs() <= 0.85 * r) & ((yy - cy).abs() <= 0.85 * r)
            else:  # apex up, base 1.8 r below it, 2.2 r wide
                depth = yy - (cy - r)
                inside = (depth >= 0) & (depth <= 1.8 * r) & ((xx - cx).abs() <= depth * 1.1 / 1.8)
            images[i][:, inside] = torch.rand(3, 1, generator=g)
            masks[i][inside] = cls
    images += 0.04 * torch.randn(images.shape, generator=g)
    return images.clamp_(0, 1), masks


def normalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


# -- model ---------------------------------------------------------------------------------
class SegHead(nn.Module):
    """A light feature-pyramid head: a 1x1 lateral per level, summed at the finest level,
    a 3x3 convolution, per-pixel classes, upsampled to the input."""

    def __init__(self, channels: list[int], width: int, classes: int) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in channels)
        self.mix = nn.Conv2d(width, width, 3, padding=1)
        self.out = nn.Conv2d(width, classes, 1)

    def forward(self, pyramid: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        finest = pyramid[0].shape[-2:]
        s = sum(
            F.interpolate(lat(f), size=finest, mode="bilinear", align_corners=False)
            for lat, f in zip(self.lateral, pyramid, strict=True)
        )
        logits = self.out(F.gelu(self.mix(s)))
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


class Segmenter(nn.Module):
    """Backbone plus :class:`SegHead`; ``method`` says where the pyramid comes from."""

    def __init__(self, method: str, bits: int, size: int, side_reduction: int = 4) -> None:
        super().__init__()
        self.backbone = efficientnet_lite0_imagenet(num_classes=0)
        # The pyramid ends at the last block: the 1x1 head convolution to 1280 channels is cut.
        self.backbone.conv_head, self.backbone.bn2 = nn.Identity(), nn.Identity()
        self.method, self.taps = method, []
        self.handle = None
        if method == "side":
            self.handle = apply_s2a(
                self.backbone,
                modules=["side"],
                side="hierarchical",
                side_strides=STRIDES,
                side_reduction=side_reduction,
                head=None,
                bits=bits,
                input_size=(3, size, size),
            )
            channels = [self.backbone.s2a_side.proj[0].out_channels] * len(STRIDES)
        else:
            modules = dict(self.backbone.named_modules())
            for name in STAGE_ENDS:
                modules[name].register_forward_hook(lambda m, a, out: self.taps.append(out))
            with torch.no_grad():
                self.backbone.eval()(torch.zeros(1, 3, size, size))
            channels = [t.shape[1] for t in self.taps]
            if method == "bias":
                self.handle = apply_s2a(self.backbone, modules=["bias"], head=None, bits=bits)
            else:
                self.backbone.requires_grad_(False)
        self.head = SegHead(channels, 64, len(CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.taps.clear()
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.method != "head"):
            out = self.backbone(x)
        pyramid = out if self.method == "side" else list(self.taps)
        return self.head(pyramid, x.shape[-2:])


# -- training and scoring --------------------------------------------------------------------
def confusion(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    k = len(CLASSES)
    matrix = torch.zeros(k, k, dtype=torch.long)
    model.eval()
    with torch.no_grad():
        for i in range(0, len(y), 64):
            pred = model(normalise(x[i : i + 64])).argmax(1)
            matrix += torch.bincount(
                y[i : i + 64].flatten() * k + pred.flatten(), minlength=k * k
            ).view(k, k)
    return matrix


def iou(matrix: torch.Tensor) -> list[float]:
    """Per-class intersection over union from a (true, predicted) confusion matrix; NaN for
    a class neither in the truth nor predicted (it scored 0 and pulled the mean down)."""
    tp = matrix.diag().double()
    union = matrix.sum(0).double() + matrix.sum(1).double() - tp
    return torch.where(union > 0, tp / union.clamp(min=1), torch.nan).tolist()


def miou(per_class: list[float]) -> float:
    """Mean IoU over the classes present in the truth or the prediction."""
    present = [v for v in per_class if not math.isnan(v)]
    return statistics.fmean(present) if present else math.nan


def json_safe(value: Any) -> Any:
    """``value`` with NaN floats (the IoU of a class absent from the test set) as None: JSON
    has no NaN, and ``json.dump`` would write a bare ``NaN`` that strict readers refuse."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def train(
    method: str, lr: float, data: dict[str, Any], args: argparse.Namespace, seed: int
) -> tuple[nn.Module, dict[str, Any]]:
    torch.manual_seed(seed)
    model = Segmenter(method, args.bits, args.size, args.side_reduction)
    model.train()
    if method == "head":  # a frozen backbone keeps its BatchNorm statistics, as S2A does
        model.backbone.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    x, y = data["train"]
    steps = math.ceil(len(y) / args.batch_size)
    total = steps * args.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total))
    )
    order = torch.Generator().manual_seed(seed)
    times, saved = [], 0
    for _ in range(args.epochs):
        model.train()
        if method == "head":
            model.backbone.eval()
        perm = torch.randperm(len(y), generator=order)
        for i in range(steps):
            idx = perm[i * args.batch_size : (i + 1) * args.batch_size]
            t0 = time.perf_counter()
            loss = F.cross_entropy(model(normalise(x[idx])), y[idx])
            if i == 0 and model.handle is not None:  # the frozen "head" backbone keeps 0
                saved = max(saved, model.handle.stats()["stored_bytes"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            times.append(time.perf_counter() - t0)
    info = {
        "trainable": sum(p.numel() for p in params),
        "backbone_saved_mib": saved / 2**20,
        "step_s": statistics.median(times),
    }
    return model, info


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=["head", "bias", "side"])
    parser.add_argument("--lrs", nargs="+", type=float, default=[1e-3, 3e-3])
    parser.add_argument("--train", type=int, default=768)
    parser.add_argument("--val", type=int, default=256)
    parser.add_argument("--test", type=int, default=512)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument(
        "--side-reduction", type=int, default=4, help="S2AConfig.side_reduction of 'side'"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if any(m not in ("head", "bias", "side") for m in args.methods):
        parser.error("methods: choose from head, bias, side")
    data = {
        "train": make_scenes(args.train, args.size, 100),
        "val": make_scenes(args.val, args.size, 101),
        "test": make_scenes(args.test, args.size, 102),
    }
    header = (
        f"tf_efficientnet_lite0 (ImageNet weights, frozen), {args.size}px scenes, "
        f"{args.train}/{args.val}/{args.test} train/val/test, batch {args.batch_size}, "
        f"{args.epochs} epochs, AdamW + cosine, lr from {args.lrs} on val, S2A at {args.bits} "
        f"bits, seed {args.seed}; CPU ({platform.machine()}, {torch.get_num_threads()} "
        f"threads), torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"
    )
    print(header, flush=True)
    rows = []
    for method in args.methods:
        tried: list[tuple[float, float, nn.Module, dict[str, Any]]] = []
        for lr in args.lrs:
            start = time.perf_counter()
            model, info = train(method, lr, data, args, args.seed)
            info["train_s"] = time.perf_counter() - start
            val = miou(iou(confusion(model, *data["val"])))
            print(
                f"  {method} lr={lr:g}: val mIoU {100 * val:.1f} ({info['train_s']:.0f} s)",
                flush=True,
            )
            tried.append((val, lr, model, info))
        val, lr, model, info = max(tried, key=lambda t: t[0])
        per_class = iou(confusion(model, *data["test"]))
        rows.append(
            {
                "method": method,
                "lr": lr,
                "val_miou": 100 * val,
                "test_miou": 100 * miou(per_class),
                "test_iou": {c: 100 * v for c, v in zip(CLASSES, per_class, strict=True)},
                **info,
            }
        )
    print(
        "\n| method | lr | test mIoU % | "
        + " | ".join(f"IoU {c}" for c in CLASSES)
        + " | trainable | kept by S2A MiB/batch | step s |"
    )
    print("|---|---:|---:|" + "---:|" * len(CLASSES) + "---:|---:|---:|")
    for r in rows:
        cells = " | ".join(f"{r['test_iou'][c]:.1f}" for c in CLASSES)
        print(
            f"| {r['method']} | {r['lr']:g} | {r['test_miou']:.1f} | {cells} | "
            f"{r['trainable']:,} | {r['backbone_saved_mib']:.2f} | {r['step_s']:.3f} |"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(json_safe({"header": header, "rows": rows}), f, indent=1, allow_nan=False)


if __name__ == "__main__":
    main()
