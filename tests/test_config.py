"""Bad input gets a clear error that names the field and the allowed values."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_s2a import S2AConfig, apply_s2a


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        ({"bits": 3}, r"bits=3 is not supported: choose one of \(1, 2, 4, 8\)"),
        ({"modules": ["bias", "lora"]}, r"modules: unknown module kind 'lora'; allowed: \('bias'"),
        ({"modules": []}, r"modules: choose at least one"),
        ({"modules": ["bias", "bias"]}, r"lists a module kind twice"),
        ({"op_bits": {"gelu": 4}}, r"op_bits: unknown operator kind 'gelu'; allowed: \("),
        ({"op_bits": {"softmax": 6}}, r"op_bits\['softmax'\]=6 is not supported"),
        ({"trainable_input_bits": 5}, r"trainable_input_bits=5 is not supported"),
        ({"backend": "cuda"}, r"backend: unknown backend 'cuda'; allowed: \('auto'"),
        ({"backend": "bnb", "bits": 2}, r"bitsandbytes quantizes in 4 bits only"),
        ({"backend": "bnb", "bnb_quant_type": "int4"}, r"bnb_quant_type: 'int4' is not one of"),
        ({"group_size": 48}, r"group_size: 48 is not one of"),
        ({"min_numel": 0}, r"min_numel: must be a positive integer"),
    ],
)
def test_invalid_config_values_raise_value_error(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        S2AConfig(**kwargs)


def test_modules_accept_plus_and_comma_strings():
    assert S2AConfig(modules="bias").modules == ("bias",)
    assert S2AConfig(modules="bias+prompt").modules == ("bias", "prompt")


def test_unknown_override_names_the_field():
    with pytest.raises(ValueError, match=r"unknown S2AConfig field\(s\) \['bitz'\]"):
        apply_s2a(nn.Linear(4, 4), bitz=4)


def test_head_auto_needs_get_classifier():
    with pytest.raises(ValueError, match=r"get_classifier.*S2AConfig\(head='fc'\)"):
        apply_s2a(nn.Sequential(nn.Linear(4, 4)))


def test_named_head_that_does_not_exist():
    model = nn.Sequential()
    model.add_module("body", nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"head='fc'.*no submodule.*\['body'\]"):
        apply_s2a(model, head="fc")


def test_nothing_left_to_train_is_an_error_and_changes_nothing():
    model = nn.Sequential(nn.Linear(4, 4, bias=False))
    with pytest.raises(ValueError, match="nothing left to train"):
        apply_s2a(model, head=None)
    assert model[0].weight.requires_grad


def test_applying_twice_is_an_error():
    model = nn.Sequential(nn.Linear(4, 4))
    handle = apply_s2a(model, head=None)
    with pytest.raises(RuntimeError, match=r"already applied.*handle.remove\(\)"):
        apply_s2a(model, head=None)
    handle.remove()


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        ({"bn_mode": "frozen"}, r"bn_mode: 'frozen' is not one of \('eval', 'train'\)"),
        ({"block_layout": "nwc"}, r"block_layout: 'nwc' is not one of"),
        ({"prompt_rank": 0}, r"prompt_rank: must be a positive integer"),
        ({"side_reduction": 2.5}, r"side_reduction: must be a positive integer"),
        ({"side_width": -1}, r"side_width: must be a positive integer or None"),
        ({"input_size": (3, 0, 224)}, r"input_size: expected the shape of one sample"),
    ],
)
def test_invalid_structure_fields(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        S2AConfig(**kwargs)


def test_bias_only_trains_biases_and_head():
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2, bias=False))
    with apply_s2a(model, head="2") as handle:
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == {"0.bias", "1.bias", "2.weight"}
        count, fraction = handle.trainable_parameters()
        assert count == 8 + 8 + 16
        assert fraction == pytest.approx(count / (32 + 8 + 8 + 8 + 16))


def test_config_rejects_non_config():
    with pytest.raises(TypeError, match="config must be an S2AConfig"):
        apply_s2a(nn.Linear(2, 2), {"bits": 4})
    with pytest.raises(TypeError, match=r"expects an nn\.Module"):
        apply_s2a(torch.zeros(2))
