"""`llmos bench programs`: agent programs scheduled as programs, KV retained across tool calls."""

from __future__ import annotations

from typing import Annotated

import typer

from llmos.commands._common import console


def bench_programs(
    quick: Annotated[bool, typer.Option(help="A tiny trace (seconds), to check it runs.")] = False,
    full: Annotated[bool, typer.Option(help="The issue's size: 60 programs of 3-12 calls, 64-256 "
                                            "new tokens a call (hours on a 2-core CPU).")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the trace.")] = 0,
    threads: Annotated[int | None, typer.Option(help="Torch threads (default 1: the fastest on a "
                                                     "shared 2-core machine).")] = None,
    model: Annotated[str, typer.Option(help="Embedded model.")] = "smollm2-135m-instruct",
    output: Annotated[str | None, typer.Option(help="JSON results path.")] = None,
) -> None:
    """Multi-agent trace: per-call FCFS, FCFS with the prefix cache, and llmos (las + KV retention).

    Example: llmos bench programs
    """
    from llmos.bench.programs import run_programs_bench

    run_programs_bench(console, quick=quick, full=full, model=model, json_path=output, seed=seed,
                       threads=threads)


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    bench_app.command("programs")(bench_programs)
