"""Deadline-aware serving: a latency profile, a latency model that turns deadlines into budgets, and an
OpenAI-style chat endpoint on LitServe. ``serve(argv)`` and ``profile(argv)`` are the command lines."""

from __future__ import annotations

from typing import Any


def serve(argv: list[str]) -> Any:
    """``adaptive-mllm serve``: see :func:`adaptive_mllm.serving.server.main`."""
    from adaptive_mllm.serving.server import main

    return main(argv)


def profile(argv: list[str]) -> Any:
    """``adaptive-mllm profile``: see :func:`adaptive_mllm.serving.profile.main`."""
    from adaptive_mllm.serving.profile import main

    return main(argv)
