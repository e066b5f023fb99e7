"""Token prompts sit on fixed patch positions: each row of a prompt on a block of tokens
belongs to one patch of the grid it was sized for. A call at another image size with as many
tokens (a dynamic-size ViT sized at 32x32 and called at 16x64: a 4x4 grid, then 2x8) adds
every row to another patch; the prompt's own shape check sees only the token count. So the
image each forward runs on is read where it enters the model, and each token prompt checks
that it still makes the grid the prompt was sized for.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .hierarchical import patch_grids, token_grid


class ImageSize:
    """The (H, W) of the image the current forward runs on: read by pre-hooks on the model
    and on its convolutions that take the image's channels (a patch embedding), so a model
    driven through ``forward_features`` is read too; None where no image was seen."""

    def __init__(self, channels: int) -> None:
        self.channels = channels
        self.now: tuple[int, int] | None = None

    def enter(self, module: nn.Module, args: tuple) -> None:
        """Pre-hook of the model: a new forward, whose image is not known yet."""
        self.now = None
        self.read(module, args)

    def read(self, module: nn.Module, args: tuple) -> None:
        """Pre-hook of a module that may take the image: note its size."""
        for a in args:
            if isinstance(a, torch.Tensor) and a.dim() == 4 and a.shape[1] == self.channels:
                self.now = (int(a.shape[-2]), int(a.shape[-1]))
                return

    @staticmethod
    def hooked(model: nn.Module) -> list[nn.Module]:
        """The modules besides the model whose pre-hook reads the image: its 2-D
        convolutions (the check of the channel count keeps a feature map out)."""
        return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


class PromptGrid:
    """The patch grid a token prompt was sized for, checked against each call's image."""

    def __init__(self, image: ImageSize, size: tuple[int, int], grid: tuple[int, int], s: int):
        self.image, self.size, self.grid, self.stride = image, size, grid, s

    @classmethod
    def of(
        cls, image: ImageSize, size: tuple[int, int], tokens: int, prefix: int | None
    ) -> PromptGrid | None:
        """The grid of ``tokens`` over an image of ``size``, or None where they make none
        (a token model that is no patch grid: nothing to check)."""
        try:
            stride, skip = token_grid(tokens, size, prefix)
        except ValueError:
            return None
        grids = patch_grids(size, stride)
        grid = next((g for g in grids if g[0] * g[1] == tokens - skip), grids[0])
        return cls(image, size, grid, stride)

    def check(self, name: str) -> None:
        """Raise if this forward's image makes another grid of as many patches at the
        prompt's stride: the tokens fit the prompt's shape and are patches elsewhere. Tokens
        that are no patches (a Perceiver's latents: as many at any size) pass, and another
        count is the prompt's own shape error."""
        now = self.image.now
        if now is None or now == self.size:
            return
        grids = patch_grids(now, self.stride)
        cells = self.grid[0] * self.grid[1]
        if self.grid in grids or all(g[0] * g[1] != cells for g in grids):
            return
        other = next(g for g in grids if g[0] * g[1] == cells)
        raise RuntimeError(
            f"the prompt on block {name!r} was sized for a {self.size[0]}x{self.size[1]} input, "
            f"a {self.grid[0]}x{self.grid[1]} grid of patches; this forward's "
            f"{now[0]}x{now[1]} input makes a {other[0]}x{other[1]} grid of as many tokens, "
            "on which the prompt's rows would land on other patches, silently. Apply S2A with "
            "S2AConfig(input_size=(C, H, W)) for the size your data have (one apply_s2a per "
            "resolution)."
        )


def attach_image_size(model: nn.Module, channels: int, hooks: list[Any]) -> ImageSize:
    """An :class:`ImageSize` reading ``model``'s image, its hooks appended to ``hooks``."""
    image = ImageSize(channels)
    hooks.append(model.register_forward_pre_hook(image.enter))
    hooks.extend(m.register_forward_pre_hook(image.read) for m in ImageSize.hooked(model))
    return image
