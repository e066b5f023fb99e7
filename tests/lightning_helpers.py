"""A user-style LightningModule and data for the Lightning tests and the DDP script."""

from __future__ import annotations

import lightning.pytorch as pl
import timm
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset


class UserModule(pl.LightningModule):
    """Shaped like a user's project: a timm backbone under ``.backbone``, AdamW on everything."""

    def __init__(self):
        super().__init__()
        self.backbone = timm.create_model(
            "vit_tiny_patch16_224", num_classes=4, depth=2, img_size=32, patch_size=8
        )

    def forward(self, x):
        return self.backbone(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)  # all parameters, as users do


#: CLI arguments for a small random-init model at a small resolution, on one CPU: every CLI
#: test runs in seconds.
CLI_SMALL = [
    "--model.backbone",
    "resnet18",
    "--model.pretrained",
    "false",
    "--data.image_size",
    "32",
    "--trainer.accelerator",
    "cpu",
    "--trainer.devices",
    "1",
]


def quiet_trainer(**kwargs) -> pl.Trainer:
    """A one-device CPU Trainer that prints nothing and writes nothing unless a keyword says
    so (a logger, checkpointing with a ``default_root_dir``): the tests' shared settings."""
    options = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    return pl.Trainer(**{**options, **kwargs})


def _data(n=32, batch_size=8):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


class EncoderClassifier(pl.LightningModule):
    """A user's own layout: ``self.encoder`` (a timm model without its head) and
    ``self.classifier`` outside it, AdamW on ``self.parameters()``.

    ``entry="forward_features"`` calls the encoder through that method (then pools itself),
    ``no_grad=True`` runs the encoder under ``torch.no_grad()`` (a user's mistake).
    """

    def __init__(
        self,
        lr: float = 1e-3,
        scheduler: bool = False,
        arch: str = "vit",
        entry: str = "forward",
        no_grad: bool = False,
        fail_at: int = -1,
    ):
        super().__init__()
        self.save_hyperparameters()
        if arch == "vit":
            self.encoder = timm.create_model(
                "vit_tiny_patch16_224", num_classes=0, depth=2, img_size=32, patch_size=8
            )
        else:
            self.encoder = timm.create_model("resnet10t", num_classes=0)
        self.classifier = torch.nn.Linear(self.encoder.num_features, 4)

    def features(self, x):
        if self.hparams.entry == "forward_features":
            return self.encoder.forward_head(self.encoder.forward_features(x), pre_logits=True)
        return self.encoder(x)

    def forward(self, x):
        return self.classifier(self.features(x))

    def training_step(self, batch, batch_idx):
        if batch_idx == self.hparams.fail_at:
            raise RuntimeError("user error in training_step")
        x, y = batch
        if self.hparams.no_grad:
            with torch.no_grad():
                h = self.features(x)
            return F.cross_entropy(self.classifier(h), y)
        return F.cross_entropy(self.classifier(self.features(x)), y)  # its parts, not self(x)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", F.cross_entropy(self(x), y))

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test/loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


class LateEncoder(EncoderClassifier):
    """Builds its encoder in ``configure_model``, as large-model projects do."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.encoder = None

    def configure_model(self):
        if self.encoder is None:
            self.encoder = timm.create_model(
                "vit_tiny_patch16_224", num_classes=0, depth=2, img_size=32, patch_size=8
            )


class FourWayData(pl.LightningDataModule):
    """A user's own DataModule: 32 random 32x32 images, 4 classes."""

    def __init__(self, batch_size: int = 8):
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self):
        return _data(32, self.batch_size)

    def val_dataloader(self):
        return _data(8, self.batch_size)

    def test_dataloader(self):
        return _data(8, self.batch_size)
