"""`adaptive-mllm`: dispatches to a subcommand.

``fit`` / ``validate`` / ``test`` / ``predict`` run the recipe's LightningCLI (:mod:`adaptive_mllm.recipe`);
``benchmark``, ``plot``, ``export``, ``serve`` and ``profile`` have their own parsers. Nothing else lives here, so no module
needs to import this one back.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from adaptive_mllm import benchmark, export, plots, serving
from adaptive_mllm.recipe import build_cli

__all__ = ["build_cli", "main"]

SUBCOMMANDS: dict[str, Callable[[list[str]], object]] = {
    "benchmark": benchmark.main,
    "plot": plots.main,
    "export": export.main,
    "serve": serving.serve,
    "profile": serving.profile,
}


def main(args: list[str] | None = None) -> None:
    """Lightning's subcommands (fit / validate / test / predict), plus ``benchmark``, ``plot``, ``export``, ``serve`` and ``profile``."""
    os.environ.setdefault("WANDB_SILENT", "true")
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] in SUBCOMMANDS:
        SUBCOMMANDS[argv[0]](argv[1:])
        return
    build_cli(args)


if __name__ == "__main__":
    main()
