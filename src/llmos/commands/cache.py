"""`llmos cache`: what the llmos home keeps that can be thrown away, and throwing it away.

Two kinds of disposable state: the weight cache (`cache/`: dequantized GGUF
weights, about 514 MB per model, rebuilt on the next load) and the agents'
scratch directories (`scratch/PID`: each agent's working files). Guarantee:
`llmos cache clear` never removes the scratch directory of an agent that is
still alive in a running kernel or server (it is listed as kept).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from llmos.commands._common import console, fail

KINDS = ("weights", "scratch")


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def live_pids(home: Path) -> set[int]:
    """Pids of agents alive in a kernel or server that is running on `home` now."""
    from llmos.kernel import ProcessTable

    path = home / "kernel.db"
    if not path.exists():
        return set()
    table = ProcessTable(path)
    try:
        boots = {b["boot"] for b in table.live_boots()}
        return {r["pid"] for r in table.processes(only_live=True, limit=100_000) if r["boot"] in boots}
    finally:
        table.close()


def entries(home: Path) -> dict[str, list[Path]]:
    """The disposable entries of each kind."""
    weights = home / "cache"
    scratch = home / "scratch"
    return {"weights": sorted(weights.iterdir()) if weights.is_dir() else [],
            "scratch": sorted(scratch.iterdir()) if scratch.is_dir() else []}


def show() -> None:
    """List the weight cache and the agents' scratch directories with their sizes.

    Example: llmos cache
    """
    from llmos.home import llmos_home

    home = llmos_home()
    found = entries(home)
    table = Table("kind", "where", "entries", "size", title=f"llmos home {home}", title_justify="left")
    table.add_row("weights", str(home / "cache"), str(len(found["weights"])),
                  _human(sum(_size(p) for p in found["weights"])))
    table.add_row("scratch", str(home / "scratch"), str(len(found["scratch"])),
                  _human(sum(_size(p) for p in found["scratch"])))
    console.print(table)
    console.print("[dim]llmos cache clear \\[weights|scratch] frees them (weights are rebuilt on the next "
                  "load; a live agent's scratch is kept).[/]")


def clear(kind: Annotated[str | None, typer.Argument(help="weights or scratch (default: both).")]
          = None) -> None:
    """Delete the weight cache and/or the scratch directories of agents that have ended.

    Example: llmos cache clear scratch
    """
    from llmos.home import llmos_home

    if kind is not None and kind not in KINDS:
        fail(f"unknown cache {kind!r}; choose one of {', '.join(KINDS)}")
    home = llmos_home()
    found = entries(home)
    alive = live_pids(home) if kind in (None, "scratch") else set()
    for k in KINDS if kind is None else (kind,):
        freed, removed, kept = 0, 0, 0
        for path in found[k]:
            if k == "scratch" and path.name.isdigit() and int(path.name) in alive:
                kept += 1
                continue
            freed += _size(path)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed += 1
        note = f", kept {kept} of live agents" if kept else ""
        console.print(f"{k}: removed {removed} entries, {_human(freed)} freed{note}")


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    cache_app = typer.Typer(help="See and clear the weight cache and agents' scratch directories.",
                            invoke_without_command=True)

    @cache_app.callback()
    def _default(ctx: typer.Context) -> None:
        if ctx.invoked_subcommand is None:
            show()

    cache_app.command("list")(show)
    cache_app.command("clear")(clear)
    app.add_typer(cache_app, name="cache")
