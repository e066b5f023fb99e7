"""What the command line and config files say, read before jsonargparse parses them.

jsonargparse hands a config file's ``init_args`` for one class to whichever class a later
source names instead, and ``--print_config`` prints while parsing. The ``lightning-s2a`` CLI
(:mod:`.cli`) reads the sources itself, in order, to name its default classes only where the
user names none, to give a class named in place of another its own defaults back, and to
refuse a print that would show another class's values: config files (``--config``, as a file
or inline, and the YAML files their ``model:``/``data:`` name), ``--model``/``--data`` (a
class, a dict or a YAML file), and single values (``--model.lr``).
"""

from __future__ import annotations

import glob
import importlib
import inspect
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import yaml

SUBCOMMANDS = ("fit", "validate", "test", "predict")


def class_path_of(cls: type) -> str:
    """``module.Class`` of a class, as a config names it."""
    return f"{cls.__module__}.{cls.__qualname__}"


def default_config_files(parser_kwargs: Any, args: Any) -> list[str]:
    """The files a CLI's ``parser_kwargs`` give as ``default_config_files``, for the root
    parser and for the subcommand ``args`` run (``{"fit": {...}}`` is fit's alone), ``~``
    and glob patterns expanded, as jsonargparse reads them."""
    if not isinstance(parser_kwargs, dict):
        return []
    tokens = args if isinstance(args, (list, tuple)) else ()
    subcommand = next((t for t in tokens if t in SUBCOMMANDS), None)
    sources = [parser_kwargs, parser_kwargs.get(subcommand) if subcommand else None]
    patterns = [
        p for src in sources if isinstance(src, dict) for p in src.get("default_config_files") or ()
    ]
    return [
        path
        for pattern in patterns
        for path in sorted(glob.glob(os.path.expanduser(os.fspath(pattern))))
    ]


def as_config_args(files: Sequence[str]) -> list[str]:
    """``files`` as the ``--config`` arguments that come first (the sources read before the
    command line, as default config files are)."""
    return [token for path in files for token in ("--config", path)]


def with_default_classes(
    args: Any, defaults: dict[str, type], config_files: Sequence[str] = ()
) -> Any:
    """``args`` with the shipped default classes named where the user names none: not on
    the command line, in a ``--config`` file, nor in the CLI's ``default_config_files``
    (``config_files``; until 2026-12-07 a user's CLI whose default config named its classes
    trained ImageClassifier on digits, silently: named in the arguments, the default
    overrode the file).

    A jsonargparse default that carries a class_path hands its init_args to whichever class
    the user names instead, wherever the names match (a user's lr 1e-3 became
    ImageClassifier's 3e-3). A default written into the arguments, as if typed first, is
    replaced whole when the user names a class, on the command line or in a config file.
    """
    in_files = {key for path in config_files for key in _classes_in_config(path, defaults)}
    defaults = {k: c for k, c in defaults.items() if k not in in_files}
    if isinstance(args, dict) or not isinstance(args, (list, tuple)):
        if isinstance(args, dict):
            args = {**{k: {"class_path": class_path_of(c)} for k, c in defaults.items()}, **args}
        return args
    args = list(args)
    named: set[str] = set()
    for flag, value in _flags(args):
        for key in defaults:
            if flag in (f"--{key}", f"--{key}.class_path"):
                named.add(key)
        if flag in ("--config", "-c"):
            named |= _classes_in_config(value, defaults)
    extra = [
        t for k, cls in defaults.items() if k not in named for t in (f"--{k}", class_path_of(cls))
    ]
    at = next((i + 1 for i, t in enumerate(args) if t in SUBCOMMANDS), 0)
    return [*args[:at], *extra, *args[at:]]


def _flags(args: list[str]) -> Iterator[tuple[str, str]]:
    """``(flag, value)`` for each argument: the value after its ``=``, else the next
    argument ("" if none)."""
    for i, token in enumerate(args):
        flag, _, value = token.partition("=")
        yield flag, value or (args[i + 1] if i + 1 < len(args) else "")


def _config_sections(given: str) -> list[dict]:
    """A ``--config`` value's top level and its per-subcommand sections ([] if unreadable):
    a YAML file, or YAML/JSON given inline. A ``model``/``data`` value naming a YAML file
    (``model: my_model.yaml``) is that file's content, found beside the config as
    jsonargparse finds it."""
    base = os.path.dirname(given) if os.path.isfile(given) else ""
    loaded = _loaded(given) if os.path.isfile(given) else _inline(given)
    if not isinstance(loaded, dict):
        return []  # jsonargparse reports an unreadable config itself
    sections = [loaded, *(loaded[c] for c in SUBCOMMANDS if isinstance(loaded.get(c), dict))]
    return [
        {
            k: _nested_file(v, base) if k in ("model", "data", "trainer") else v
            for k, v in section.items()
        }
        for section in sections
    ]


def _inline(given: str) -> Any:
    """A config given inline (``--config '{"model": ...}'``), or None."""
    if ":" not in given:
        return None
    try:
        return yaml.safe_load(given)
    except yaml.YAMLError:
        return None


def _scalar(given: str) -> Any:
    """A flag's value as the parser reads it (``-1``, ``null``), else the string."""
    try:
        return yaml.safe_load(given)
    except yaml.YAMLError:
        return given


def _nested_file(value: Any, base: str) -> Any:
    """A section's value, or the content of the YAML file it names (beside the config
    first, then as given)."""
    if not isinstance(value, str) or not value.endswith((".yaml", ".yml", ".json")):
        return value
    for path in (os.path.join(base, value), value):
        if os.path.isfile(path):
            return _loaded(path)
    return value


def _classes_in_config(path: str, keys: dict[str, type]) -> set[str]:
    """Which of ``keys`` a YAML config file names a class for (top level or per subcommand)."""
    return {
        key
        for section in _config_sections(path)
        for key in keys
        if isinstance(section.get(key), str)
        or (isinstance(section.get(key), dict) and "class_path" in section[key])
    }


def carried_init_args(args: list[str], key: str, class_path: str) -> dict[str, Any]:
    """The ``init_args`` written for another class under ``key``, which jsonargparse hands to
    ``class_path`` when a later source names that class instead (``--config quickstart.yaml
    --model my.Module``: my.Module would get ImageClassifier's lr), less the ones written for
    ``class_path`` itself or set on the command line.

    Sources, in order: config files (``--config``), a class or a class with its init_args as
    a dict or a YAML file (``--key``), single values (``--key.name``).
    """
    last: dict[str, tuple[bool, Any]] = {}  # name -> (written for another class, value)

    def entry(value: Any) -> None:
        if not isinstance(value, dict):  # a class named alone
            return
        init = value.get("init_args")
        written_class = value.get("class_path")
        # written for this class, or for whichever class it is (no class_path), is the user's
        foreign = written_class is not None and not _carries_over(str(written_class), class_path)
        for name, v in (init if isinstance(init, dict) else {}).items():
            last[name] = (foreign, v)

    for flag, value in _flags(args):
        if flag in ("--config", "-c"):
            for section in _config_sections(value):
                if key in section:
                    entry(section[key])
        elif flag == f"--{key}.init_args":  # several values at once: a dict or a YAML file
            given = _loaded(value)
            for name in given if isinstance(given, dict) else {}:
                last[name] = (False, None)
        elif flag.startswith(f"--{key}."):
            name = flag.removeprefix(f"--{key}.").removeprefix("init_args.").split(".")[0]
            last[name] = (False, None)
        elif flag == f"--{key}":  # a class path, a dict, or a YAML file of one
            entry(_loaded(value))
    # the last source to write a value decides whose it is
    return {name: v for name, (foreign, v) in last.items() if foreign}


def _named_class(args: list[str], key: str) -> str | None:
    """The class the last source names under ``key``: a config file or inline config (its
    ``key`` a class path, a dict with one, or a YAML file of one), ``--key``, or
    ``--key.class_path``."""
    named = None

    def of(value: Any) -> Any:
        return value.get("class_path", None) if isinstance(value, dict) else value

    for flag, value in _flags(args):
        if flag in ("--config", "-c"):
            for section in _config_sections(value):
                if isinstance(of(section.get(key)), str):
                    named = of(section[key])
        elif flag == f"--{key}":
            given = of(_loaded(value))  # a class, or a dict or YAML file naming one
            named = given if isinstance(given, str) else named
        elif flag == f"--{key}.class_path":
            named = value
    return named


def refuse_printing_carried_args(args: list[str]) -> None:
    """``--print_config`` prints while parsing, before a class named in place of a config
    file's gets its own defaults back: it printed the file's values for the other class, and
    a run from the printed file used them, silently. Such a print is refused, whichever
    source named the class (``--model``, ``--model.class_path``, a later config file)."""
    if not any(a.partition("=")[0] == "--print_config" for a in args):
        return
    for key in ("model", "data"):
        named = _named_class(args, key)
        if isinstance(named, str) and carried_init_args(args, key, named):
            raise SystemExit(
                f"error: --print_config would print the config file's init_args for another "
                f"class under {key} in place of {named}'s own defaults (they are restored only "
                f"after printing). Print without --{key}, or run once and keep the config.yaml "
                "Lightning saves next to the logs, which holds the values the run used."
            )


def sets_trainer(
    args: list[str] | dict[str, Any], name: str, counts: Callable[[Any], bool] = lambda v: True
) -> bool:
    """True if the command line or a config file sets ``trainer.<name>`` to a value that
    ``counts``: ``--trainer.<name>``, ``--trainer`` with a YAML file or inline dict, a config's
    ``trainer:`` section (inline, or a YAML file it names), or the ``trainer`` entry of
    arguments given as a dict."""
    if isinstance(args, dict):
        sections = [args, *(args[c] for c in SUBCOMMANDS if isinstance(args.get(c), dict))]
        return any(_names(section.get("trainer"), name, counts) for section in sections)
    for flag, value in _flags(args):
        if flag == f"--trainer.{name}" and counts(_scalar(value)):
            return True
        if flag == "--trainer" and _names(_loaded(value), name, counts):
            return True
        if flag in ("--config", "-c") and any(
            _names(s.get("trainer"), name, counts) for s in _config_sections(value)
        ):
            return True
    return False


def _names(trainer: Any, name: str, counts: Callable[[Any], bool]) -> bool:
    """True if a trainer section (a dict) sets ``name`` to a value that ``counts``."""
    return isinstance(trainer, dict) and name in trainer and counts(trainer[name])


def _loaded(given: str) -> Any:
    """A ``--model``/``--data`` value: a dict given inline or in a YAML file, else the string."""
    try:
        if given.lstrip().startswith("{"):
            return yaml.safe_load(given)
        if os.path.isfile(given):
            with open(given) as f:
                return yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        pass  # jsonargparse reports it
    return given


def default_of(cls: type, name: str) -> Any:
    """The default of ``cls``'s init argument ``name``, looked up the class hierarchy (an
    argument passed on through ``**kwargs``); ``inspect.Parameter.empty`` if it has none."""
    for klass in cls.__mro__:
        if "__init__" in vars(klass):
            param = inspect.signature(klass.__init__).parameters.get(name)
            if param is not None and param.kind is not param.VAR_KEYWORD:
                return param.default
    return inspect.Parameter.empty


def _same_class(written: str, resolved: str) -> bool:
    """A config's class path (in full, the class name alone, or another import path of the
    same class, e.g. a package's re-export) names the resolved one."""
    if written == resolved or ("." not in written and resolved.endswith("." + written)):
        return True
    if "." not in resolved and written.endswith("." + resolved):  # --model ImageClassifier
        return True
    found = [import_class(path) for path in (written, resolved)]
    return found[0] is not None and found[0] is found[1]


def _carries_over(written: str, resolved: str) -> bool:
    """Whether init_args written for class ``written`` are the user's for ``resolved``: the
    same class, or a subclass of it (``--model my.Variant`` beside a config file for
    ``my.Module``: its optimizer and schedule were replaced by the subclass's defaults,
    silently, until 2026-12-07), also named by its class name alone (``--model Variant``)."""
    if _same_class(written, resolved):
        return True
    parent = import_class(written)
    if not isinstance(parent, type):
        return False
    if "." not in resolved:
        return _subclass_named(parent, resolved)
    child = import_class(resolved)
    return isinstance(child, type) and issubclass(child, parent)


def _subclass_named(parent: type, name: str) -> bool:
    """Whether a subclass of ``parent`` (imported so far) is called ``name``."""
    stack, seen = list(parent.__subclasses__()), set()
    while stack:
        cls = stack.pop()
        if cls in seen:
            continue
        seen.add(cls)
        if cls.__name__ == name:
            return True
        stack.extend(cls.__subclasses__())
    return False


def import_class(path: str) -> Any:
    """The object at a dotted ``module.Class`` path, or None where it does not import."""
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name, None) if module else None
    except Exception:  # a path that does not import is no class to compare
        return None
