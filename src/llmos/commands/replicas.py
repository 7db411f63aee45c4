"""`llmos bench replicas`: 2 engine replicas on Ray under each router, on a shared-prefix workload."""

from __future__ import annotations

from typing import Annotated

import typer

from llmos.commands._common import console


def bench_replicas(
    quick: Annotated[bool, typer.Option(help="A small workload (6 conversations x 3 turns).")] = False,
    replicas: Annotated[int, typer.Option(help="Engine replicas (Ray actors).")] = 2,
    model: Annotated[str, typer.Option(help="Embedded model.")] = "smollm2-135m-instruct",
    ray_address: Annotated[str | None, typer.Option(help="A Ray cluster to run on (default: a local Ray).")]
    = None,
    think_s: Annotated[float | None, typer.Option(help="Mean pause before each turn, s (default 0.5; "
                                                   "0: turns follow each other at once).")] = None,
    output: Annotated[str | None, typer.Option("--json", help="Where to write the JSON results.")] = None,
) -> None:
    """Conversations with long system prompts, turns interleaved, routed round-robin, least-loaded and
    prefix-aware: prefix-cache hit rate, prefill saved, throughput, TTFT p50/p99.

    Example: llmos bench replicas --quick
    """
    from llmos.bench.replicas import run_replicas_bench

    run_replicas_bench(console, quick=quick, model=model, replicas=replicas, json_path=output,
                       ray_address=ray_address, think_s=think_s)


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    bench_app.command("replicas")(bench_replicas)
