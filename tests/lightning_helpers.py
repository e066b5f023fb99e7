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


def _data(n=32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=8)
