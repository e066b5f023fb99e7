"""``Trainer(strategy="s2a")`` and ``"s2a_ddp"``: S2A as a strategy, same effect as the callback.

A strategy carries an :class:`S2ACallback` and adds it to the trainer when it connects to the
model, so both paths run the same code: the same config gives the same trained weights, the
same metrics and the same checkpoint state.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy, StrategyRegistry
from torch.nn.parallel import DistributedDataParallel

from ..config import S2AConfig, check_field_names
from .callback import S2ACallback
from .other_callbacks import copies_model_in_setup

_CONFIG_FIELDS = {f.name for f in dataclasses.fields(S2AConfig)}


class S2AStrategyMixin:
    """Shared by the S2A strategies: owns the callback, adds it to the trainer on connect."""

    s2a_callback: S2ACallback

    def _init_s2a(
        self,
        config: S2AConfig | None,
        backbone: str | None,
        adapter_path: str | None,
        fields: dict,
        count_outside: bool = True,
    ) -> None:
        self.s2a_callback = S2ACallback(
            config,
            backbone=backbone,
            adapter_path=adapter_path,
            count_outside=count_outside,
            **fields,
        )

    def connect(self, model: Any) -> None:
        super().connect(model)  # type: ignore[misc]
        trainer = model._trainer
        if trainer is not None and self.s2a_callback not in trainer.callbacks:
            # Before the first weight-averaging callback (EMA, SWA), which copies the model in
            # its setup and must copy it as S2A made it; after the others, as a listed
            # callback would.
            callbacks = trainer.callbacks
            at = next(
                (i for i, c in enumerate(callbacks) if copies_model_in_setup(c)),
                len(callbacks),
            )
            callbacks.insert(at, self.s2a_callback)


def _keyword_names(*functions: Callable[..., Any], skip: tuple[str, ...] = ()) -> frozenset[str]:
    """The names these functions take as keyword arguments (``self`` and ``skip`` left out)."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    names = {
        p.name
        for fn in functions
        for p in inspect.signature(fn).parameters.values()
        if p.kind in kinds
    }
    return frozenset(names - {"self", *skip})


def _split(
    kwargs: dict[str, Any], accepted: frozenset[str], parent: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """S2AConfig fields and the parent strategy's arguments; any other name is an error here,
    not an obscure ``TypeError`` from Lightning (or from DDP at the first fit)."""
    check_field_names(kwargs, also=accepted, also_from=parent)
    fields = {k: v for k, v in kwargs.items() if k in _CONFIG_FIELDS}
    return fields, {k: v for k, v in kwargs.items() if k not in _CONFIG_FIELDS}


class S2AStrategy(S2AStrategyMixin, SingleDeviceStrategy):
    """Single-device training with S2A: ``Trainer(strategy="s2a")`` or ``S2AStrategy(bits=2)``."""

    strategy_name = "s2a"
    # ``device`` is an argument of its own here.
    _parent_arguments = _keyword_names(SingleDeviceStrategy.__init__, skip=("device",))

    def __init__(
        self,
        config: S2AConfig | None = None,
        backbone: str | None = None,
        adapter_path: str | None = None,
        count_outside: bool = True,
        device: str | torch.device | None = None,
        **kwargs: Any,
    ) -> None:
        fields, rest = _split(kwargs, self._parent_arguments, "SingleDeviceStrategy")
        super().__init__(device=device if device is not None else "cpu", **rest)
        self._device_given = device is not None
        self._devices: list[torch.device] = []
        self._init_s2a(config, backbone, adapter_path, fields, count_outside)

    # Lightning fills ``parallel_devices`` of a strategy built from the registry with the
    # Trainer's devices; that is how ``Trainer(strategy="s2a", accelerator="gpu")`` gets cuda:0.
    @property
    def parallel_devices(self) -> list[torch.device]:
        return self._devices

    @parallel_devices.setter
    def parallel_devices(self, devices: list[torch.device] | None) -> None:
        self._devices = list(devices or [])
        if self._devices and not self._device_given:
            if len(self._devices) > 1:
                raise ValueError(
                    f"strategy='s2a' trains on one device, got {len(self._devices)}; "
                    "use strategy='s2a_ddp' for several."
                )
            self._root_device = self._devices[0]

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(cls.strategy_name, cls, description=cls.__doc__.splitlines()[0])


class S2ADDPStrategy(S2AStrategyMixin, DDPStrategy):
    """Distributed data parallel with S2A: ``Trainer(strategy="s2a_ddp", devices=N)``.

    S2A is applied before DDP wraps the model, so only trainable parameters are synchronised.
    """

    strategy_name = "s2a_ddp"
    # DDPStrategy passes the keyword arguments it does not take to DistributedDataParallel
    # (find_unused_parameters, static_graph, ...); Lightning itself sets module and device_ids.
    _parent_arguments = _keyword_names(
        DDPStrategy.__init__, DistributedDataParallel.__init__, skip=("module", "device_ids")
    )

    def __init__(
        self,
        config: S2AConfig | None = None,
        backbone: str | None = None,
        adapter_path: str | None = None,
        count_outside: bool = True,
        **kwargs: Any,
    ) -> None:
        fields, rest = _split(
            kwargs, self._parent_arguments, "DDPStrategy and DistributedDataParallel"
        )
        super().__init__(**rest)
        self._init_s2a(config, backbone, adapter_path, fields, count_outside)

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(cls.strategy_name, cls, description=cls.__doc__.splitlines()[0])


def register() -> None:
    """Put "s2a" and "s2a_ddp" into Lightning's strategy registry (idempotent)."""
    for cls in (S2AStrategy, S2ADDPStrategy):
        if cls.strategy_name not in StrategyRegistry:
            cls.register_strategies(StrategyRegistry)
