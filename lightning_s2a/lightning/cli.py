"""``lightning-s2a``: Lightning's CLI with an ``s2a`` section.

``lightning-s2a fit|validate|test|predict`` is a :class:`~lightning.pytorch.cli.LightningCLI`
whose model defaults to :class:`ImageClassifier` and whose data default to
:class:`DigitsDataModule` (both replaceable: ``--model MyModule``, ``--data
ImageFolderDataModule --data.root DIR``). Every :class:`~lightning_s2a.S2AConfig` field is an
option of the ``s2a`` section (``--s2a.bits 4``, ``--s2a.modules [bias,prompt]``, or YAML
``s2a: {bits: 4, modules: [bias]}``), with two more: ``--s2a.enabled false`` runs the plain
baseline without S2A, and ``--s2a.adapter_path PATH`` writes the trained adapter at the end of
``fit``. When enabled, the CLI builds an :class:`S2ACallback` and hands it to the Trainer.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import re
import sys
import warnings
from functools import partial, update_wrapper
from types import MethodType
from typing import Any

from lightning.pytorch import Callback, Trainer
from lightning.pytorch import cli as lightning_cli
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_warn

from ..config import S2AConfig, config_differences
from .callback import S2ACallback
from .checkpoint import marked_prefixes, s2a_state
from .checks import SECTION_CALLBACKS
from .cli_sources import (
    as_config_args,
    carried_init_args,
    default_config_files,
    default_of,
    import_class,
    refuse_printing_carried_args,
    sets_trainer,
    with_default_classes,
)
from .data import DigitsDataModule, sized_from_data
from .model import ImageClassifier
from .strategy import S2AStrategyMixin

S2A_KEY = "s2a"
#: Trainer defaults of ``lightning-s2a`` (a config or flag overrides them): a short fine-tune.
TRAINER_DEFAULTS: dict[str, Any] = {"max_epochs": 3, "log_every_n_steps": 10}
_EXTRA_HELP = {
    "enabled": "Apply S2A (false: the plain baseline, every parameter trains, nothing is "
    "compressed).",
    "adapter_path": "Write the trained S2A adapter (safetensors) here at the end of fit.",
    "backbone": "Attribute of the LightningModule that holds the backbone (default: "
    "'backbone' if it exists, else the whole module).",
    "count_outside": "Count what the module's parts outside the backbone (your head) save in "
    "the s2a/activation_* metrics (false: for a head that runs torch.func in its forward).",
    "modules": "Structural modules that train: a list such as [bias,prompt], or one name "
    "('bias', 'side', 'bias+prompt').",
}


def _field_help(cls: type) -> dict[str, str]:
    """The ``#:`` comments above each dataclass field, as help texts."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    helps: dict[str, str] = {}
    pending: list[str] = []
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("#:"):
            pending.append(stripped[2:].strip())
            continue
        match = re.match(r"^(\w+)\s*:", stripped)
        if match and pending:
            helps[match.group(1)] = " ".join(pending)
        pending = []
    return helps


def add_s2a_arguments(parser: LightningArgumentParser, key: str = S2A_KEY) -> None:
    """Add every S2AConfig field as ``--{key}.FIELD``, plus ``enabled``, ``adapter_path``,
    ``backbone`` and ``count_outside`` (the :class:`S2ACallback` arguments).

    The section stays a plain namespace (not instantiated by jsonargparse) so that the two
    extra options can live in it; :meth:`S2ALightningCLI.before_instantiate_classes` builds and
    validates the :class:`S2AConfig` from it.
    """
    parser.add_class_arguments(S2AConfig, key, instantiate=False, skip={"modules"})
    group = parser.groups.get(key, parser) if hasattr(parser, "groups") else parser
    default_modules = [f.default for f in dataclasses.fields(S2AConfig) if f.name == "modules"]
    group.add_argument(
        f"--{key}.modules",
        type=list[str] | str,
        default=list(default_modules[0]) if default_modules else ["bias"],
    )
    group.add_argument(f"--{key}.enabled", type=bool, default=True)
    group.add_argument(f"--{key}.adapter_path", type=str | None, default=None)
    group.add_argument(f"--{key}.backbone", type=str | None, default=None)
    group.add_argument(f"--{key}.count_outside", type=bool, default=True)
    helps = {**_field_help(S2AConfig), **_EXTRA_HELP}
    for action in parser._actions:
        name = action.dest.removeprefix(f"{key}.")
        if action.dest.startswith(f"{key}.") and name in helps and not action.help:
            action.help = helps[name]


def s2a_config_from_namespace(section: Any) -> tuple[bool, S2AConfig, dict[str, Any]]:
    """``(enabled, config, callback_kwargs)`` from the parsed ``s2a`` section (validated);
    ``callback_kwargs`` are the :class:`S2ACallback` arguments ``adapter_path``,
    ``backbone`` and ``count_outside``."""
    fields = dict(section.clone().as_dict() if hasattr(section, "as_dict") else section)
    fields = {k: v for k, v in fields.items() if not k.startswith("__")}  # --s2a FILE's __path__
    enabled = bool(fields.pop("enabled", True))
    callback_kwargs = {k: fields.pop(k, None) for k in ("adapter_path", "backbone")}
    callback_kwargs["count_outside"] = bool(fields.pop("count_outside", True))
    config = S2AConfig(**fields)
    if not enabled:
        # Off means off (the same config file runs the plain baseline), but not without a
        # word: an adapter is not written, a strategy keeps its own config.
        given = config_differences(config, S2AConfig())
        given += [k for k in ("adapter_path", "backbone") if callback_kwargs[k] is not None]
        given += [] if callback_kwargs["count_outside"] else ["count_outside"]
        if given:
            rank_zero_warn(
                f"s2a.enabled=false turns the s2a section off: its {given} are ignored (no "
                "adapter is written). S2A given in trainer.strategy or trainer.callbacks "
                "runs with its own config (init_args: {config: {...}}): set them there."
            )
    return enabled, config, callback_kwargs


class S2ALightningCLI(LightningCLI):
    """LightningCLI with the ``s2a`` section; adds an :class:`S2ACallback` when enabled.

    Defaults: ``ImageClassifier`` model, ``DigitsDataModule`` data (both in subclass mode, so
    any LightningModule/LightningDataModule can be named instead), seed 0, and
    :data:`TRAINER_DEFAULTS`. After construction, ``cli.s2a_config`` is the validated config
    (None when ``--s2a.enabled false``) and ``cli.s2a_callback`` the callback given to the
    Trainer.
    """

    s2a_config: S2AConfig | None = None
    s2a_callback: S2ACallback | None = None
    s2a_callback_kwargs: dict[str, Any] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("seed_everything_default", 0)
        kwargs["trainer_defaults"] = {**TRAINER_DEFAULTS, **(kwargs.get("trainer_defaults") or {})}
        given = kwargs.get("args")
        tokens = (
            given if isinstance(given, dict) else list(sys.argv[1:] if given is None else given)
        )
        # a real budget: max_steps=-1 and max_time=None are Lightning's "none"
        budget = sets_trainer(tokens, "max_steps", _positive) or sets_trainer(
            tokens, "max_time", lambda v: v is not None
        )
        if budget and not sets_trainer(tokens, "max_epochs"):
            # a step or time budget alone: our epoch default would end the run first
            # (Lightning's own has no epoch limit then)
            kwargs["trainer_defaults"].pop("max_epochs", None)
        model_class = kwargs.get("model_class", args[0] if args else None)
        data_class = kwargs.get("datamodule_class", args[1] if len(args) > 1 else None)
        defaults: dict[str, type] = {}
        if kwargs["subclass_mode_model"] and issubclass(ImageClassifier, model_class or object):
            defaults["model"] = ImageClassifier
        if kwargs["subclass_mode_data"] and issubclass(DigitsDataModule, data_class or object):
            defaults["data"] = DigitsDataModule
        argv = kwargs.get("args")
        given_args = sys.argv[1:] if argv is None else argv
        files = default_config_files(kwargs.get("parser_kwargs"), given_args)
        kwargs["args"] = with_default_classes(given_args, defaults, files)
        self._argv = kwargs["args"] if isinstance(kwargs["args"], list) else []
        # the default config files are read first: their values for another class are
        # handed over as a --config file's are (see _restore_own_defaults)
        self._sources = [*as_config_args(files), *self._argv]
        refuse_printing_carried_args(self._sources)
        with warnings.catch_warnings():
            if argv is None:  # the command line itself, passed on with the default classes
                warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        add_s2a_arguments(parser)

    def before_instantiate_classes(self) -> None:
        parser = self._parser(self.subcommand)
        self._restore_own_defaults(parser)
        try:
            enabled, config, callback_kwargs = s2a_config_from_namespace(
                self._get(self.config, S2A_KEY)
            )
        except (TypeError, ValueError) as err:
            parser.error(f"invalid s2a option: {err}")
        self.s2a_config = config if enabled else None
        self.s2a_callback_kwargs = callback_kwargs if enabled else None
        adapter = (
            enabled and self.subcommand not in (None, "fit") and callback_kwargs.get("adapter_path")
        )
        if adapter and self._get(self.config, "ckpt_path", default=None) is None:
            parser.error(
                f"--s2a.adapter_path is where fit writes the trained adapter; {self.subcommand} "
                "does not read it (it evaluated the untrained model). Evaluate a checkpoint "
                "with --ckpt_path, or load the adapter in code (lightning_s2a.load_adapter)."
            )
        if adapter:  # a fit's saved config.yaml, replayed with the checkpoint: nothing written
            assert self.s2a_callback_kwargs is not None
            self.s2a_callback_kwargs["adapter_path"] = None
            rank_zero_warn(
                f"--s2a.adapter_path is where fit writes the trained adapter; {self.subcommand} "
                "evaluates --ckpt_path and neither reads nor writes the adapter (ignored)."
            )
        if enabled:
            strategy = self._get(self.config, "trainer", default={}).get("strategy")
            name = strategy if isinstance(strategy, str) else getattr(strategy, "class_path", "")
            if isinstance(name, str) and (
                "s2a" in name.lower().rsplit(".", 1)[-1] or _is_s2a_strategy(name)
            ):
                parser.error(
                    f"trainer.strategy={name!r} applies S2A itself and so does the s2a section; "
                    "set --s2a.enabled false to configure S2A through the strategy, or use a "
                    "plain strategy."
                )

    def _restore_own_defaults(self, parser: LightningArgumentParser) -> None:
        """A class named on the command line in place of a config file's (not a subclass of
        it) keeps its own defaults: the file's init_args for the other class are not handed
        over, and those it wrote are named (until 2026-12-07 silently)."""
        for key in ("model", "data"):
            section = self._get(self.config, key, default=None)
            class_path = getattr(section, "class_path", None)
            if not isinstance(class_path, str):
                continue
            carried = carried_init_args(self._sources, key, class_path)
            init_args = getattr(section, "init_args", None)  # absent: a class without any
            if not carried or init_args is None:
                continue
            module, _, name = class_path.rpartition(".")
            cls = getattr(importlib.import_module(module), name)
            dropped = []
            for field_name in carried:
                if field_name not in init_args:
                    continue
                default = default_of(cls, field_name)
                if default is inspect.Parameter.empty:
                    parser.error(
                        f"--{key} {class_path} replaces the config file's class, whose "
                        f"init_args would give it {field_name}={carried[field_name]!r}; "
                        f"{name} has no default for it: set it, --{key}.{field_name} VALUE."
                    )
                init_args[field_name] = default
                dropped.append(field_name)
            if dropped:
                rank_zero_warn(
                    f"--{key} {class_path} replaces the config file's class (and is no "
                    f"subclass of it): the file's init_args for that class, {dropped}, are "
                    f"not handed to {name}, which uses its own defaults for them. Set them for "
                    f"{name} (--{key}.NAME VALUE, or a config naming {name}) to keep them."
                )

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        if self.s2a_config is None and self.subcommand != "fit":
            return super().instantiate_trainer(**kwargs)
        trainer_config = self._get(self.config_init, "trainer", default={})
        callbacks = kwargs.pop("callbacks", trainer_config.get("callbacks"))
        if callbacks is None:
            callbacks = []
        elif not isinstance(callbacks, list):
            callbacks = [callbacks]
        if self.s2a_config is None:  # a plain fit: it must not resume an S2A run's checkpoint
            kwargs["callbacks"] = [*callbacks, PlainResume()]
            return super().instantiate_trainer(**kwargs)
        config = sized_from_data(self.s2a_config, self.datamodule)
        self.s2a_config = config
        self.s2a_callback = S2ACallback(config=config, **(self.s2a_callback_kwargs or {}))
        if any(isinstance(c, S2ACallback) for c in callbacks):
            self._parser(self.subcommand).error(
                "trainer.callbacks already has an S2ACallback and the s2a section adds one; "
                "set --s2a.enabled false, or remove the callback from trainer.callbacks."
            )
        kwargs["callbacks"] = [self.s2a_callback, *callbacks]
        trainer = super().instantiate_trainer(**kwargs)
        # Lightning puts an S2ACallback the module's configure_callbacks() returns in place of
        # this one when fit starts: said then (see checks.check_single_s2a)
        SECTION_CALLBACKS[trainer] = self.s2a_callback
        return trainer

    def _add_configure_optimizers_method_to_model(self, subcommand: str | None) -> None:
        """``--optimizer``/``--lr_scheduler``: Lightning builds them here, from the parameters
        the model has before fit, but S2A adds its prompts and side network in setup, after:
        the fit stopped ("parameters that S2A trains are in no optimizer") with advice for a
        ``configure_optimizers`` the user never wrote. The same classes and arguments are
        built again when the trainer asks for them (a method of the model, as Lightning's:
        the model still pickles, for ``ddp_spawn`` and ``torch.save``)."""
        inits: list[dict] = []
        build = lightning_cli.instantiate_class

        def noted(args: Any, init: dict) -> Any:
            inits.append(init)
            return build(args, init)

        lightning_cli.instantiate_class = noted  # what Lightning instantiates, and how
        try:
            super()._add_configure_optimizers_method_to_model(subcommand)
        finally:
            lightning_cli.instantiate_class = build
        model = self.model
        if "configure_optimizers" not in model.__dict__ or not inits:
            return  # no --optimizer: the model's own configure_optimizers stays
        fn = partial(
            _optimizers_when_asked,
            optimizer_init=inits[0],
            scheduler_init=inits[1] if len(inits) > 1 else None,
            configure=self.configure_optimizers,
        )
        update_wrapper(fn, self.configure_optimizers)  # as Lightning's (``is_overridden``)
        model.configure_optimizers = MethodType(fn, model)


def _optimizers_when_asked(
    model: Any, optimizer_init: dict, scheduler_init: dict | None, configure: Any
) -> Any:
    """``configure_optimizers`` of ``--optimizer``/``--lr_scheduler``: built from the
    parameters the model has when the trainer asks (S2A's prompts and side included)."""
    optimizer = lightning_cli.instantiate_class(model.parameters(), optimizer_init)
    scheduler = (
        lightning_cli.instantiate_class(optimizer, scheduler_init) if scheduler_init else None
    )
    return configure(model, optimizer, scheduler)


class PlainResume(Callback):
    """With the s2a section off, refuse to resume an S2A run's checkpoint where no S2A
    strategy or callback runs: the fit would go on training every parameter where the run
    trained S2A's few (after a bias-only epoch, the next trained all 5.5M of a reviewer's
    ViT-Ti, silently with ``--optimizer``; with the model's own optimizers PyTorch refused
    the optimizer state with an error that named neither S2A nor the fix). Checked when
    Lightning restores the checkpoint, whichever way it was named (a path, ``last``,
    ``best``)."""

    def on_load_checkpoint(
        self, trainer: Trainer, pl_module: Any, checkpoint: dict[str, Any]
    ) -> None:
        if trainer.state.fn != "fit" or isinstance(trainer.strategy, S2AStrategyMixin):
            return
        if any(isinstance(c, S2ACallback) for c in trainer.callbacks):
            return
        if s2a_state(checkpoint) is not None or marked_prefixes(checkpoint):
            raise ValueError(
                f"the checkpoint resumed ({trainer.ckpt_path}) is an S2A run's, and S2A is "
                "off here (--s2a.enabled false): resumed, the fit would go on training every "
                "parameter where the run trained S2A's few. Resume with S2A on (drop "
                "--s2a.enabled false); to fine-tune its weights in full, load them into the "
                "model (lightning_s2a.load_from_checkpoint) and start a new fit without "
                "--ckpt_path."
            )


def _is_s2a_strategy(class_path: str) -> bool:
    """True where ``class_path`` imports as a subclass of the S2A strategies (a user's own
    strategy built on them, whose name need not say S2A)."""
    cls = import_class(class_path)
    return isinstance(cls, type) and issubclass(cls, S2AStrategyMixin)


def _positive(value: Any) -> bool:
    """True for a step count that limits a run (Lightning reads -1 and None as no limit)."""
    try:
        return int(value) > 0
    except (TypeError, ValueError):
        return value is not None


def main(args: ArgsType = None) -> None:
    """Entry point of the ``lightning-s2a`` console script (``bench`` is its own subcommand)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub at run time
    argv = list(args) if isinstance(args, (list, tuple)) else sys.argv[1:] if args is None else None
    if argv and argv[0] == "bench":
        from ..bench.run import main as bench_main

        bench_main(argv[1:])
        return
    S2ALightningCLI(args=args)


if __name__ == "__main__":
    main()
