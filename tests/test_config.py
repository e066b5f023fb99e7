"""Bad input gets a clear error that names the field and the allowed values."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_s2a import S2ACallback, S2AConfig, S2ADDPStrategy, S2AStrategy, apply_s2a
from lightning_s2a.engine.bitpack import check_bits


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
        ({"backend": "bnb", "group_size": 16}, r"bitsandbytes codes blocks of 32 or more"),
        ({"op_bits": {"trainable": 4}}, r"trainable_input_bits=4\) instead"),
        ({"head": "None"}, r"head: 'None' is the string; for None write null"),
        ({"frozen_dtype": "None"}, r"--s2a\.frozen_dtype null"),
        ({"min_numel": 0}, r"min_numel: must be a positive integer"),
        # an option without the setting it acts under did nothing, silently
        (
            {"modules": ["prompt"], "add_bias": True},
            r"add_bias=True acts only with the 'bias' module, which this config lacks "
            r"\(modules=\['prompt'\], side='pooled', backend='auto'\)\. Add 'bias' to modules, or "
            r"leave add_bias",
        ),
        ({"prompt_rank": 4}, r"prompt_rank=4 acts only with the 'prompt' module"),
        ({"modules": "bias+prompt", "side_width": 64}, r"side_width=64 .* the 'side' module"),
        ({"side_reduction": 2}, r"side_reduction=2.*Add 'side' to modules, or leave"),
        ({"blocks": "encoder.*"}, r"blocks='encoder.\*' acts only with the 'prompt' or 'side'"),
        ({"block_layout": "nchw"}, r"block_layout='nchw' .*Add 'prompt' or 'side' to modules"),
        ({"bnb_quant_type": "fp4"}, r"bnb_quant_type='fp4' acts only with backend='bnb'"),
    ],
)
def test_invalid_config_values_raise_value_error(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        S2AConfig(**kwargs)


def test_a_saved_config_drops_options_without_their_setting_in_a_chain():
    """A file written before these options were refused loads with each dropped, and an
    option that depends on a dropped one goes with it; a whole one keeps every option."""
    old = {"modules": ["bias"], "side": "hierarchical", "side_strides": [4, 8], "blocks": "a.*"}
    loaded = S2AConfig.from_saved(old)
    assert (loaded.side, loaded.side_strides, loaded.blocks) == ("pooled", (8, 16, 32), None)
    whole = {**old, "modules": ["side"], "side_merge": "add"}
    loaded = S2AConfig.from_saved(whole)
    assert (loaded.side, loaded.side_strides, loaded.side_merge) == ("hierarchical", (4, 8), "add")
    assert loaded.blocks == "a.*"


# Values of the wrong type: each compares equal to or looks like a valid one (4.0 == 4, a
# non-empty string is truthy), so without a type check they were accepted and misbehaved later.
@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        ({"bits": 4.0}, r"bits=4\.0 is not supported: expected an int \(float given\); choose one"),
        ({"bits": True}, r"bits=True is not supported: expected an int \(bool given\)"),
        ({"op_bits": {"softmax": 8.0}}, r"op_bits\['softmax'\]=8\.0 is not supported: expected an"),
        ({"op_bits": [("softmax", 8)]}, r"op_bits: expected a mapping from operator kind"),
        ({"trainable_input_bits": 8.0}, r"trainable_input_bits=8\.0 is not supported"),
        ({"compress": "no"}, r"compress: 'no' \(str\) is not a bool; allowed: True, False"),
        ({"surgery": "false"}, r"surgery: 'false' \(str\) is not a bool; allowed: True, False"),
        ({"stochastic_rounding": 1}, r"stochastic_rounding: 1 \(int\) is not a bool"),
        ({"add_bias": None}, r"add_bias: None \(NoneType\) is not a bool"),
        ({"group_size": 64.0}, r"group_size: 64\.0 \(float\) is not an int; allowed: \(8, 16"),
        ({"seed": 1.5}, r"seed: must be a non-negative integer, got 1\.5"),
        ({"seed": -1}, r"seed: must be a non-negative integer, got -1"),
        ({"seed": True}, r"seed: must be a non-negative integer, got True"),
        ({"min_numel": True}, r"min_numel: must be a positive integer, got True"),
        ({"codebook_samples": 1e4}, r"codebook_samples: must be a positive integer"),
        ({"codebook_refresh": "1000"}, r"codebook_refresh: must be a positive integer"),
        ({"prompt_rank": 8.0}, r"prompt_rank: must be a positive integer"),
        ({"side_width": True}, r"side_width: must be an integer of at least 2 or None"),
        ({"head": False}, r"head: False \(bool\) is not a submodule name; allowed: 'auto'"),
        ({"head": ""}, r"head: '' \(str\) is not a submodule name"),  # would be the whole model
        ({"modules": None}, r"modules: expected a list of module kinds or a string"),
        ({"modules": [1]}, r"modules: unknown module kind 1; allowed:"),
        ({"backend": 1}, r"backend: unknown backend 1; allowed:"),
        ({"bnb_quant_type": "int4"}, r"bnb_quant_type: 'int4' is not one of"),  # any backend
        ({"frozen_dtype": torch.bfloat16}, r"frozen_dtype: torch\.bfloat16 is not one of"),
        ({"bn_mode": True}, r"bn_mode: True is not one of"),
        ({"block_layout": None}, r"block_layout: None is not one of"),
        ({"blocks": []}, r"blocks: expected a pattern .* or a list of module names, got \(\)"),
        ({"blocks": ["encoder.0", 1]}, r"blocks: expected a pattern"),
        ({"blocks": ""}, r"blocks: expected a pattern"),
        ({"input_size": 224}, r"input_size: expected the shape of one sample, .* got 224"),
        ({"input_size": (3, 224.0, 224)}, r"input_size: expected the shape of one sample"),
    ],
)
def test_values_of_the_wrong_type_raise_value_error(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        S2AConfig(**kwargs)
    with pytest.raises(ValueError, match=pattern):  # replace validates again
        S2AConfig().replace(**kwargs)


@pytest.mark.parametrize("bits", [4.0, True, "4", None])
def test_check_bits_wants_a_real_int(bits):
    with pytest.raises(ValueError, match=r"field=.* is not supported: expected an int"):
        check_bits(bits, "field")
    assert check_bits(4) == 4


def test_valid_values_of_every_field_are_kept():
    cfg = S2AConfig(
        bits=2,
        modules=["bias", "prompt"],
        head=None,
        compress=False,
        op_bits={"softmax": 8},
        trainable_input_bits=8,
        group_size=32,
        stochastic_rounding=True,
        backend="torch",
        seed=0,
        prompt_rank=4,
        blocks=["encoder.0", "encoder.1"],
        input_size=[3, 32, 32],
        add_bias=True,
        surgery=False,
        frozen_dtype="bfloat16",
    )
    assert cfg.modules == ("bias", "prompt") and cfg.blocks == ("encoder.0", "encoder.1")
    assert cfg.input_size == (3, 32, 32) and cfg.op_bits == {"softmax": 8}
    assert S2AConfig(modules="prompt", blocks="encoder.*").blocks == "encoder.*"
    assert S2AConfig(backend="bnb", bnb_quant_type="fp4").bnb_quant_type == "fp4"
    # stochastic rounding still reaches bnb's softmax rows and min-max fallbacks: accepted
    assert S2AConfig(backend="bnb", stochastic_rounding=True).stochastic_rounding
    side = S2AConfig(modules=["side"], side_width=16, side_reduction=2)
    assert (side.side_width, side.side_reduction) == (16, 2)


_UNKNOWN = r"unknown S2AConfig field\(s\) \['bitz'\]; known fields: \['add_bias', 'backend', 'bits'"


@pytest.mark.parametrize(
    "make",
    [
        lambda: S2AStrategy(bitz=4),
        lambda: S2ADDPStrategy(bitz=4),
        lambda: S2ACallback(bitz=4),
        lambda: S2AConfig().replace(bitz=4),
    ],
    ids=["S2AStrategy", "S2ADDPStrategy", "S2ACallback", "replace"],
)
def test_unknown_keyword_names_the_field_and_lists_the_known_ones(make):
    # Not Lightning's obscure TypeError (strategy), nor DDP's at the first fit (s2a_ddp).
    with pytest.raises(ValueError, match=_UNKNOWN):
        make()


def test_strategies_still_take_their_lightning_arguments():
    import datetime

    strategy = S2AStrategy(bits=2, device="cpu", checkpoint_io=None, precision_plugin=None)
    assert strategy.s2a_callback.config.bits == 2
    ddp = S2ADDPStrategy(
        bits=2,
        process_group_backend="gloo",
        timeout=datetime.timedelta(seconds=60),
        find_unused_parameters=True,  # DDPStrategy hands this on to DistributedDataParallel
        static_graph=True,
    )
    assert ddp.s2a_callback.config.bits == 2
    assert ddp._ddp_kwargs == {"find_unused_parameters": True, "static_graph": True}
    with pytest.raises(
        ValueError, match=r"Also accepted by DDPStrategy .*'find_unused_parameters'"
    ):
        S2ADDPStrategy(find_unused_parameter=True)
    with pytest.raises(ValueError, match=r"compress: 'no' \(str\) is not a bool"):
        S2AStrategy(compress="no")


def test_modules_accept_plus_and_comma_strings():
    assert S2AConfig(modules="bias").modules == ("bias",)
    assert S2AConfig(modules="bias+prompt").modules == ("bias", "prompt")
    # the README's value in a list (the CLI's [bias+prompt]) and spaces after commas: they
    # were "unknown module kind 'bias+prompt'" and "' prompt'"
    assert S2AConfig(modules=["bias+prompt"]).modules == ("bias", "prompt")
    assert S2AConfig(modules="bias, prompt").modules == ("bias", "prompt")


def test_fields_set_after_construction_are_validated_by_apply_s2a():
    """A field assigned after construction skips __post_init__; apply_s2a validates again, so
    a string of modules is parsed (not read letter by letter) and a bad width is named."""
    model = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 2))
    config = S2AConfig(head="2")
    config.modules = "bias+prompt"
    config.blocks, config.input_size = ["0"], (4, 8)  # tokens: (batch, 4, 8)
    with apply_s2a(model, config) as handle:
        assert handle.config.modules == ("bias", "prompt")
        assert hasattr(model[0], "s2a_prompt")  # the prompt module went in
    config = S2AConfig(head="2")
    config.bits = 3
    with pytest.raises(ValueError, match=r"bits=3 is not supported"):
        apply_s2a(model, config)


def test_unknown_override_names_the_field():
    with pytest.raises(ValueError, match=r"unknown S2AConfig field\(s\) \['bitz'\]"):
        apply_s2a(nn.Linear(4, 4), bitz=4)


def test_head_auto_needs_get_classifier():
    with pytest.raises(ValueError, match=r"get_classifier.*last Linear: S2AConfig\(head='0'\)"):
        apply_s2a(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(ValueError, match=r"get_classifier.*e\.g\. S2AConfig\(head='fc'\)"):
        apply_s2a(nn.Sequential(nn.Conv1d(4, 4, 3)))


def test_named_head_that_does_not_exist():
    model = nn.Sequential()
    model.add_module("body", nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"head='fc'.*no submodule.*\['body'\]"):
        apply_s2a(model, head="fc")


def test_a_head_that_names_a_parameter_says_how_to_train_it():
    """CLIP's ``logit_scale``: "has no submodule of that name" left no way to train it."""
    model = nn.Sequential()
    model.add_module("body", nn.Linear(4, 4))
    model.register_parameter("logit_scale", nn.Parameter(torch.ones(())))
    match = r"head='logit_scale' is a parameter.*model\.logit_scale\.requires_grad_\(True\)"
    for head in ("logit_scale", "body,logit_scale"):
        with pytest.raises(ValueError, match=match):
            apply_s2a(model, head=head)


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


def test_applying_to_a_model_holding_s2a_already_is_an_error():
    """A part already S2A'd, or a copy of an S2A model (deep copy, ddp_spawn's pickle): a
    second surgery would stack on modules no live handle owns."""
    import copy

    import timm

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=3, depth=1, img_size=32)
    outer = nn.Sequential(vit)
    handle = apply_s2a(outer[0], modules="bias+prompt", input_size=(3, 32, 32))
    with pytest.raises(RuntimeError, match=r"already applied to '0' inside this Sequential"):
        apply_s2a(outer, head=None)
    with pytest.raises(RuntimeError, match=r"holds S2A's 'blocks.0.s2a_prompt'.*a copy"):
        apply_s2a(copy.deepcopy(outer[0]))
    handle.remove()
    apply_s2a(copy.deepcopy(outer[0])).remove()  # S2A taken off: nothing of it left to refuse
    # S2A on the whole, then on a part: the part carries the whole's engine hooks
    whole = apply_s2a(outer, head=None, modules="bias")
    # (named as such: it said "no S2A handle owns it ... a copy of an S2A model" until
    # 2026-12-07, though the whole's handle lives)
    with pytest.raises(RuntimeError, match=r"applied to a Sequential that contains this Block"):
        apply_s2a(outer[0].blocks[0], head=None)
    whole.remove()
    own = nn.Sequential(nn.Linear(4, 4))
    own.s2a_scale = nn.Parameter(torch.ones(4))  # the user's own name: no S2A of ours
    apply_s2a(own, head=None).remove()


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        ({"bn_mode": "frozen"}, r"bn_mode: 'frozen' is not one of \('eval', 'train'\)"),
        ({"block_layout": "nwc"}, r"block_layout: 'nwc' is not one of"),
        ({"prompt_rank": 0}, r"prompt_rank: must be a positive integer"),
        ({"side_reduction": 2.5}, r"side_reduction: must be a positive integer"),
        ({"side_width": -1}, r"side_width: must be an integer of at least 2 or None"),
        ({"side_width": 1}, r"at width 1 its output is the same for every input"),
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
    # the callback and the strategy: at construction, not an AttributeError at fit
    for config in ({"bits": 2}, "bias"):
        with pytest.raises(TypeError, match=r"must be an S2AConfig.*S2ACallback\(bits=2"):
            S2ACallback(config)
        with pytest.raises(TypeError, match=r"must be an S2AConfig"):
            S2AStrategy(config)


def test_an_s2a_model_is_freed_when_dropped_and_pickles_after_a_step():
    """The handle lives on its model: dropping both frees them (a registry keyed weakly by
    the model held the handle, and through it the model: +96 MiB per fold of a ResNet-50).
    ``torch.save(model)`` works after a training step (the operator cache held torch's
    descriptors), and the loaded copy, like a deep copy, has no handle of its own."""
    import copy
    import gc
    import io
    import weakref

    import timm

    from lightning_s2a import get_handle

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=3, depth=1, img_size=32)
    handle = apply_s2a(model)
    x = torch.randn(2, 3, 32, 32)
    model(x).sum().backward()
    assert get_handle(model) is handle
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert get_handle(loaded) is None and get_handle(copy.deepcopy(model)) is None
    assert torch.equal(loaded.eval()(x), model.eval()(x))
    with pytest.raises(RuntimeError, match=r"holds S2A's 'engine hooks'.*a copy"):
        apply_s2a(loaded)  # bias-only: its engine's hooks came with it
    with pytest.raises(RuntimeError, match=r"'engine hooks on 0'.*a copy"):
        apply_s2a(nn.Sequential(loaded, nn.Linear(3, 2)), head=None)  # inside a wrapper
    nf4 = timm.create_model("vit_tiny_patch16_224", num_classes=3, depth=1, img_size=32)
    with apply_s2a(nf4, frozen_dtype="nf4"):
        nf4(x).sum().backward()
        torch.save(nf4, io.BytesIO())  # its step check's weak references stay behind
    handle.stop_engine(watch=True)  # the watch's gradient hooks (C++) must not hold it
    alive = weakref.ref(model)
    del model, handle, loaded
    gc.collect()
    assert alive() is None
