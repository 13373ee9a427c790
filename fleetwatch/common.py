"""Helpers shared by the CLI modules: consoles, error exit, logging setup."""

from __future__ import annotations

import logging
import sys

import typer
from rich.console import Console

from fleetwatch.settings import get_settings

__all__ = ["console", "err", "fail", "get_settings", "setup_logging"]

console = Console()
err = Console(stderr=True)


def fail(message: str, code: int = 2) -> None:
    """Print a clear error and exit with ``code`` (no traceback)."""
    err.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)


def setup_logging() -> None:
    """Log to stderr (supervisord captures it) with Kafka's chatter turned down."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    logging.getLogger("kafka").setLevel(logging.WARNING)
