"""What every llmos command shares: the consoles and the one-line error exit."""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console

console = Console()
err = Console(stderr=True)


def fail(message: str) -> NoReturn:
    """Print one red line naming what was wrong and exit with status 2 (no traceback)."""
    err.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(2)
