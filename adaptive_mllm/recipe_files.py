"""Recipe files named in their errors: a YAML syntax error or a key the recipe does not take is reported with the
file (and line, or key) in one line, where jsonargparse says ``in "<unicode string>"`` after its usage."""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch.cli import LightningArgumentParser


class RecipeError(ValueError):
    """A recipe file that cannot be read; the message names the file and what is wrong in it."""


def _config_values(args: list[str]) -> list[str]:
    """What ``args`` give as ``--config`` / ``-c``."""
    values = []
    for index, arg in enumerate(args):
        if arg in ("--config", "-c") and index + 1 < len(args):
            values.append(args[index + 1])
        elif arg.startswith("--config="):
            values.append(arg.partition("=")[2])
    return values


def recipe_files(args: list[str]) -> list[Path]:
    """The existing files ``args`` give as ``--config`` / ``-c`` (a value that is no file, a YAML string or a path
    that does not exist, is left to the parser)."""
    # jsonargparse parses a file from inside its folder
    return [Path(value).absolute() for value in _config_values(args) if value and Path(value).is_file()]


def check_recipe_files(args: list[str]) -> None:
    """Each ``--config`` file in ``args`` is YAML holding a mapping of recipe sections, or a RecipeError naming it and
    what is wrong: the line and the column of a syntax error (jsonargparse names none: ``in "<unicode string>"``,
    after its usage), an empty file or a list (jsonargparse says ``Unexpected config:``, a tool reading it an
    AttributeError), a data section such as recipes/benchmarks/*.yaml (jsonargparse names one of its keys as not an
    option of the recipe, not that the whole file belongs to ``--data``)."""
    for value in _config_values(args):
        if value and Path(value).is_dir():
            raise RecipeError(f"--config {value}: a directory, not a recipe file (e.g. recipes/tiny.yaml)")
    for path in recipe_files(args):
        try:
            content = yaml.safe_load(path.read_bytes())
        except yaml.MarkedYAMLError as error:
            mark = error.problem_mark or error.context_mark
            where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            what = "; ".join(part for part in (error.context, error.problem) if part)
            raise RecipeError(f"{path}{where}: not valid YAML ({what})") from None
        except yaml.YAMLError as error:
            raise RecipeError(f"{path}: not valid YAML ({error})") from None
        if content is None:
            raise RecipeError(f"{path}: an empty recipe file (no settings, at most comments); a recipe maps sections (trainer:, model:, data:) to their settings")
        if not isinstance(content, dict):
            raise RecipeError(
                f"{path}: not a recipe: a YAML {type(content).__name__} where a mapping of recipe sections (trainer:, "
                "model:, data:) is expected"
            )
        datamodule = _data_section(content)
        if datamodule is not None:
            raise RecipeError(
                f"{path} is a data section (a top-level class_path {datamodule}), not a recipe: pass it as --data {path} "
                "(or to `table --benchmarks`), beside the recipe's --config"
            )


def _data_section(content: dict[str, Any]) -> str | None:
    """The class_path of a file that is one datamodule's section (``class_path`` + ``init_args`` at the top, as
    recipes/benchmarks/*.yaml), None for anything else. A short class name is looked up in adaptive_mllm.data, as
    the recipe's ``--data`` resolves it."""
    class_path = content.get("class_path")
    if not isinstance(class_path, str) or not set(content) <= {"class_path", "init_args", "dict_kwargs"}:
        return None
    from lightning import LightningDataModule

    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module or "adaptive_mllm.data"), name)
    except (ImportError, AttributeError, ValueError):
        return None
    return class_path if isinstance(cls, type) and issubclass(cls, LightningDataModule) else None


class RecipeParser(LightningArgumentParser):
    """LightningCLI's parser; an option a ``--config`` file gives that the recipe does not take (a misspelled key) is
    named with its file and place in it, in one line (jsonargparse names no file, after about 60 lines of usage)."""

    _recipe_files: list[Path] = []

    def parse_args(self, args: Any = None, *more: Any, **kwargs: Any) -> Any:
        self._recipe_files = recipe_files(list(args) if isinstance(args, (list, tuple)) else sys.argv[1:])
        return super().parse_args(args, *more, **kwargs)

    def error(self, message: str, ex: Exception | None = None) -> Any:
        if self.exit_on_error and self._recipe_files:  # the parser that would print usage and exit
            named = _unknown_option_in(message, self._recipe_files)
            if named is not None:
                raise RecipeError(named) from None
        return super().error(message, ex)


def _unknown_option_in(message: str, files: list[Path]) -> str | None:
    """``<file>: <key in it>: ...`` for jsonargparse's error about an option it does not take, where exactly one
    place in the recipe files gives that option; None otherwise (a flag, another error, no place or several, a file
    that cannot be read again): jsonargparse's own message is then printed."""
    if "NestedArg(" in message:  # given as a flag
        return None
    not_accepted = re.search(r"Option '([^']+)' is not accepted", message)
    other = re.search(r"(?:Subcommand '([^']+)'|Group '([^']+)') does not accept option '([^']+)'", message)
    if not_accepted:
        key = not_accepted[1]
        classes = re.findall(r"class_path '([^']+)'", message[: not_accepted.start()])
        cls = classes[-1] if classes else None
        if cls is None:
            found = _places(files, lambda dotted, holder: dotted == key)
        else:
            found = _places(files, lambda dotted, holder: dotted.rpartition(".")[2] == key and _names(holder, cls))
        what = f"not an argument of {cls.rpartition('.')[2] if cls else 'its class'}{_close(key, cls)}"
    elif other:
        subcommand, group, option = other[1], other[2], other[3]
        wanted = {f"{group}.{option}"} if group else {option, f"{subcommand}.{option}"}
        found = _places(files, lambda dotted, holder: dotted in wanted)
        what = "not an option of the recipe (--help lists them)"
    else:
        return None
    if len(found) != 1:
        return None
    path, dotted = found[0]
    return f"{path}: {dotted}: {what}"


def _places(files: list[Path], matches: Any) -> list[tuple[Path, str]]:
    """(file, dotted key) of every key in ``files`` that ``matches(dotted, holder)``; a file that cannot be read or
    parsed again is passed over (the reporting must never replace the parser's error with its own)."""
    found = []
    for path in files:
        try:
            tree = yaml.safe_load(path.read_bytes())
        except (OSError, yaml.YAMLError):
            continue
        found += [(path, dotted) for dotted, holder in _keys(tree) if matches(dotted, holder)]
    return found


def _keys(tree: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
    """Every mapping key of a loaded YAML file as (dotted path, the mapping with the class_path it is an argument of,
    None for a key that is no class's argument)."""
    if not isinstance(tree, dict):
        return
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        yield dotted, None
        if key == "init_args" and "class_path" in tree and isinstance(value, dict):
            for argument, given in value.items():
                yield f"{dotted}.{argument}", tree
                yield from _keys(given, f"{dotted}.{argument}.")
        else:
            yield from _keys(value, f"{dotted}.")


def _names(holder: Any, cls: str) -> bool:
    """Whether ``holder``'s class_path names ``cls`` (in full or by its short name)."""
    given = str(holder.get("class_path", "")) if isinstance(holder, dict) else ""
    return bool(given) and given.rpartition(".")[2] == cls.rpartition(".")[2]


def _close(key: str, cls: str | None) -> str:
    """``; did you mean 'x'?`` from the class's own arguments, where one is close to ``key``."""
    module, _, name = (cls or "").rpartition(".")
    try:
        parameters = list(inspect.signature(getattr(importlib.import_module(module), name)).parameters)
    except (ImportError, AttributeError, TypeError, ValueError):
        return ""
    close = difflib.get_close_matches(key, parameters, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""
