"""`llmos lab NAME`: run one lab, write its JSON and PNG, and say what the figure shows."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from llmos.commands._common import console, fail
from llmos.lab import LABS


def lab(name: Annotated[str, typer.Argument(help=f"One of: {', '.join(LABS)}.")],
        out: Annotated[Path | None, typer.Option(
            "--out", "-o", help="Directory for NAME.json and NAME.png (default: <llmos home>/lab).")] = None,
        size: Annotated[str, typer.Option(help="small (what the tests run) or full.")] = "full") -> None:
    """Redraw a lecture figure from a live run: writes NAME.png and NAME.json (every number in it)."""
    from llmos.lab import run_lab

    if name not in LABS:
        fail(f"no lab named {name!r}; the labs are {', '.join(LABS)}")
    if size not in ("small", "full"):
        fail(f"--size must be small or full, got {size!r}")
    with console.status(f"running lab {name} ({size}) on the embedded model…"):
        result = run_lab(name, out, size)
    console.print(result.summary, soft_wrap=True, highlight=False)
    console.print(f"wrote {result.png_path} and {result.json_path}")


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    app.command("lab")(lab)
