"""`adaptive-mllm`: dispatches to a subcommand.

``fit`` / ``validate`` / ``test`` / ``predict`` run the recipe's LightningCLI (:mod:`adaptive_mllm.recipe`);
``benchmark``, ``plot``, ``compare``, ``export``, ``ask``, ``serve``, ``profile``, ``table`` and ``memory`` have their
own parsers. Nothing else lives here, so no module
needs to import this one back.
"""

from __future__ import annotations

import difflib
import os
import re
import signal
import sys
from collections.abc import Callable

from lightning.pytorch.utilities.exceptions import SIGTERMException

from adaptive_mllm import ask, benchmark, compare, export, memory, paper_table, plots, serving
from adaptive_mllm.recipe import build_cli
from adaptive_mllm.recipe_files import check_recipe_files

__all__ = ["build_cli", "entry_point", "main"]

TRACEBACK_VARIABLE = "ADAPTIVE_MLLM_TRACEBACK"
# torch re-raises an error from a DataLoader worker with the worker's whole traceback as its message
WORKER_ERROR = re.compile(r"Caught \w+ in DataLoader worker process \d+\.")

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")  # the recipe's LightningCLI runs these
SUBCOMMANDS: dict[str, Callable[[list[str]], object]] = {
    "benchmark": benchmark.main,
    "plot": plots.main,
    "compare": compare.main,
    "export": export.main,
    "ask": ask.main,
    "serve": serving.serve,
    "profile": serving.profile,
    "table": paper_table.main,
    "memory": memory.main,
}


def main(args: list[str] | None = None) -> None:
    """Lightning's subcommands (fit / validate / test / predict), plus ``benchmark``, ``plot``, ``compare``, ``export``,
    ``ask``, ``serve``, ``profile``, ``table`` and ``memory``."""
    os.environ.setdefault("WANDB_SILENT", "true")
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] in (["-h"], ["--help"]):
        print(f"adaptive-mllm's own subcommands (each has --help): {', '.join(SUBCOMMANDS)}; Lightning's below.\n")
    if argv and argv[0] in SUBCOMMANDS:
        check_recipe_files(argv[1:])  # a recipe that is no YAML named with its line (some tools read it themselves)
        SUBCOMMANDS[argv[0]](argv[1:])
        return
    if argv and not argv[0].startswith("-") and argv[0] not in LIGHTNING_SUBCOMMANDS:
        unknown_subcommand(argv[0])
    build_cli(args)


def unknown_subcommand(name: str) -> None:
    """Exit as argparse does (status 2) on a first word that is no subcommand: LightningCLI's own message lists only
    its four (``invalid choice: 'sweep' (choose from 'fit', 'validate', 'test', 'predict')``), not the tools'."""
    every = [*LIGHTNING_SUBCOMMANDS, *SUBCOMMANDS]
    close = difflib.get_close_matches(name, every, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    print(f"adaptive-mllm: error: unknown subcommand {name!r}{hint}; the subcommands: {' '.join(every)} (each has --help)", file=sys.stderr)
    raise SystemExit(2)


def entry_point() -> None:
    """The console script: ``main`` with an error shown as its message alone, not under a 30-60 line traceback
    (set ADAPTIVE_MLLM_TRACEBACK=1 for it)."""
    try:
        main()
    except SIGTERMException as stopped:  # a SystemExit: Lightning stopped the run between two steps (its checkpoint saved)
        if getattr(stopped, "during_test_after_fit", False):
            hint = (" during the test after training, which had finished and is saved: test it with `adaptive-mllm test`, "
                    "the same config and --ckpt_path last")  # fmt: skip
        elif sys.argv[1:2] == ["fit"]:
            hint = " (resume it with the same command and --ckpt_path last)"
        else:
            hint = " (what it wrote so far is kept)"
        print(f"adaptive-mllm: stopped by SIGTERM{hint}", file=sys.stderr)
        raise SystemExit(128 + signal.SIGTERM) from None
    except Exception as error:
        if os.environ.get(TRACEBACK_VARIABLE, "0") not in ("", "0"):
            raise
        print(f"adaptive-mllm: error: {type(error).__name__}: {message_of(error)}", file=sys.stderr)
        print(f"(the full traceback: {TRACEBACK_VARIABLE}=1 adaptive-mllm ...)", file=sys.stderr)
        raise SystemExit(1) from None


def message_of(error: Exception) -> str:
    """The error's own message; for one raised in a DataLoader worker, the message at the end of the
    worker's traceback (a bad record named by the dataset), not the traceback."""
    message = str(error)
    if not WORKER_ERROR.match(message):
        return message
    lines = message.rsplit("Traceback (most recent call last):", 1)[-1].splitlines()
    raised = next((i for i, line in enumerate(lines) if line and not line.startswith(" ")), None)
    if raised is None:
        return message
    last = "\n".join(lines[raised:]).strip()  # "package.module.SomeError: the message"
    return last.partition(": ")[2] or last


if __name__ == "__main__":
    entry_point()
