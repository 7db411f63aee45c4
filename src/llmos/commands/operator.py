"""`llmos operator | operator pending | approve | reject`, `llmos tune`, `llmos bench operator`."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated

import typer

from llmos.commands._common import console, fail

operator_app = typer.Typer(invoke_without_command=True, no_args_is_help=False,
                           help="The operator agent: keeps the host and llmos healthy under guardrails.")

_STEP_STYLE = {"finding": "yellow", "acted": "bold green", "recovered": "green", "refused": "red",
               "queued": "magenta", "dry_run": "cyan", "rolled_back": "bold red", "unrecovered": "red",
               "failed": "red"}


def _queue(path: str | None):
    from llmos.agents.operator import ApprovalQueue
    from llmos.agents.operator.operator import default_approvals_path

    return ApprovalQueue(Path(path) if path else default_approvals_path())


QueueOpt = Annotated[str | None, typer.Option("--queue", help="Approval queue file (default: llmos home).")]


@operator_app.callback()
def operator(
    ctx: typer.Context,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only report what it would do.")] = False,
    pid: Annotated[list[int] | None, typer.Option("--pid", help="Grant this process (repeatable).")] = None,
    children_of: Annotated[list[int] | None, typer.Option(
        "--children-of", help="Grant every descendant of this process (repeatable).")] = None,
    scratch: Annotated[list[Path] | None, typer.Option(
        "--scratch", help="Grant files under this directory (repeatable).")] = None,
    duration: Annotated[float | None, typer.Option(help="Seconds to run (default: until Ctrl-C).")] = None,
    interval: Annotated[float, typer.Option(help="Seconds between observations.")] = 1.0,
    model: Annotated[str | None, typer.Option(
        "--model", "-m", help="Model that proposes actions; without it the deterministic policy decides.")]
    = None,
    cpu_percent: Annotated[float, typer.Option(help="Runaway CPU line (percent of one core).")] = 80.0,
    rss_mb: Annotated[float, typer.Option(help="Memory hog line (MB resident).")] = 512.0,
    scratch_mb: Annotated[float, typer.Option(help="Full scratch directory line (MB).")] = 256.0,
    queue: QueueOpt = None,
) -> None:
    """Run the operator on this host: observe, detect, propose, guard, act, verify, roll back.

    It touches only what it is granted; destructive actions wait for `llmos operator approve ID`.
    Example: llmos operator --dry-run --children-of 1234 --scratch /tmp/scratch --duration 60
    """
    if ctx.invoked_subcommand is not None:
        return
    if not (pid or children_of or scratch):
        fail("grant the operator something to look after: --pid, --children-of or --scratch")
    for d in scratch or []:
        if not d.is_dir():
            fail(f"--scratch {d} is not a directory")
    from llmos.agents.operator import Grants

    grants = Grants(pids=frozenset(pid or ()), children_of=frozenset(children_of or ()),
                    paths=tuple(scratch or ()))
    observer_args = {"pids": pid or (), "children_of": children_of or (), "scratch": scratch or ()}
    try:
        rules = {"cpu_percent": cpu_percent, "rss_mb": rss_mb, "scratch_mb": scratch_mb}
        asyncio.run(_run_operator(grants, observer_args, rules, dry_run, duration, interval, model, queue))
    except KeyboardInterrupt:
        pass


async def _run_operator(grants, observer_args: dict, rules: dict, dry_run: bool, duration: float | None,
                        interval: float, model: str | None, queue: str | None) -> None:
    """The operator on a kernel of its own: its actions are syscalls of a process holding `grants`."""
    from llmos.agents.operator import (
        Actuator,
        Detector,
        FallbackPolicy,
        Guardrails,
        Limits,
        LLMProposer,
        Observer,
        Operator,
        default_rules,
        host_kernel,
        operator_process,
        syscalls_chat,
    )

    backend = None
    if model:
        from llmos.kernel import EngineBackend

        with console.status(f"loading {model} ..."):
            backend = EngineBackend(model)
    kernel = host_kernel(backend=backend)
    try:
        sys = await operator_process(kernel, grants)
        proposer = LLMProposer(syscalls_chat(sys)) if model else FallbackPolicy()
        op = Operator(Observer(**observer_args), proposer, Actuator(sys, grants),
                      Guardrails(Limits(), dry_run=dry_run), detector=Detector(default_rules(**rules)),
                      approvals=_queue(queue), on_event=_show)
        paths = [str(p) for p in grants.paths] or "-"
        mode = "(dry run) " if dry_run else ""
        console.print(f"operator {mode}watching pids {sorted(grants.pids) or '-'}, "
                      f"children of {sorted(grants.children_of) or '-'}, scratch {paths}; proposals by "
                      f"{op.proposer.name}; every action passes the reference monitor, audit log "
                      f"{kernel.monitor.audit.path}")
        try:
            await op.run(duration_s=duration, interval_s=interval)
        finally:
            acted = sum(e.step == "acted" for e in op.events)
            console.print(f"[dim]{len(op.events)} events, {acted} actions[/]")
    finally:
        await kernel.shutdown()


def _show(event) -> None:
    from rich.text import Text

    line = Text(f"{event.step:<11} ", style=_STEP_STYLE.get(event.step, "white"))
    line.append(event.subject + (f" {json.dumps(event.action)}" if event.action else ""))
    line.append(f" {event.detail}", style="dim")
    console.print(line, highlight=False)


@operator_app.command("pending")
def pending(queue: QueueOpt = None) -> None:
    """List the destructive actions waiting for approval.

    Example: llmos operator pending
    """
    from rich.table import Table

    rows = _queue(queue).list()
    if not rows:
        console.print("[dim]no action waits for approval[/]")
        return
    table = Table("id", "action", "why")
    for r in rows:
        action = {k: v for k, v in r["action"].items() if k != "reason"}
        table.add_row(str(r["id"]), json.dumps(action), r["action"].get("reason", ""))
    console.print(table)


@operator_app.command("approve")
def approve(approval_id: Annotated[int, typer.Argument(help="The id `llmos operator pending` shows.")],
            queue: QueueOpt = None) -> None:
    """Approve a queued destructive action; the running operator re-checks its guardrails, then acts.

    Example: llmos operator approve 3
    """
    try:
        row = _queue(queue).decide(approval_id, approve=True)
    except ValueError as e:
        fail(str(e))
    console.print(f"approved #{approval_id}: {json.dumps(row['action'])}")


@operator_app.command("reject")
def reject(approval_id: Annotated[int, typer.Argument(help="The id `llmos operator pending` shows.")],
           queue: QueueOpt = None) -> None:
    """Reject a queued destructive action.

    Example: llmos operator reject 3
    """
    try:
        _queue(queue).decide(approval_id, approve=False)
    except ValueError as e:
        fail(str(e))
    console.print(f"rejected #{approval_id}")


def tune(
    budget_s: Annotated[float, typer.Option("--budget-s", help="Time bound of the whole search.")] = 300.0,
    proposer: Annotated[str, typer.Option(help="optimiser (coordinate descent) or model.")] = "optimiser",
    model: Annotated[str, typer.Option("--model", "-m", help="The model served (and, with --proposer "
                                       "model, the one proposing).")] = "smollm2-135m-instruct",
    requests: Annotated[int, typer.Option(help="Requests of workload C (quick) per trial.")] = 8,
    max_tokens: Annotated[int, typer.Option(help="Output tokens per request at most, per trial.")] = 24,
    prompt_tokens: Annotated[int, typer.Option(help="Prompt tokens per request at most, per trial.")] = 96,
    output: Annotated[str | None, typer.Option(help="Config file to write (TOML).")] = None,
    json_path: Annotated[str | None, typer.Option("--json", help="Where to write the JSON results.")] = None,
) -> None:
    """Search engine settings for throughput within a time bound; writes the best as a config file.

    Example: llmos tune --budget-s 300
    """
    import torch
    from rich.table import Table

    from llmos.agents.operator.tune import TuneBounds, Tuner, write_config
    from llmos.bench.engine import write_report
    from llmos.bench.workloads import BenchRequest, workload_c
    from llmos.home import llmos_home
    from llmos.models.loader import load_model
    from llmos.models.registry import resolve_model

    if proposer not in ("optimiser", "model"):
        fail(f"--proposer must be optimiser or model, got {proposer!r}")
    if budget_s <= 0 or requests < 1 or max_tokens < 1 or prompt_tokens < 1:
        fail("--budget-s, --requests, --max-tokens and --prompt-tokens must be positive")
    with console.status(f"loading {model} ..."):
        loaded = load_model(resolve_model(model), dtype=torch.float32, device=torch.device("cpu"))
    reqs = [BenchRequest(r.prompt_token_ids[:prompt_tokens], min(r.max_tokens, max_tokens))
            for r in workload_c(quick=True)[:requests]]
    chat = None
    if proposer == "model":
        chat = _sync_chat(model)

    def show(trial) -> None:
        console.print(f"  {trial.tok_per_s:7.1f} tok/s  {json.dumps(trial.settings)}  [dim]{trial.note}[/]",
                      highlight=False)

    console.print(f"tuning within {budget_s:.0f}s: {len(reqs)} requests, {sum(r.max_tokens for r in reqs)} "
                  f"output tokens per trial, proposals by {proposer}")
    result = Tuner(loaded, reqs, TuneBounds(budget_s=budget_s), on_trial=show).search(proposer, chat)
    path = write_config(output or llmos_home() / "tuned.toml", result)
    table = Table(title=f"llmos tune: {len(result['trials'])} trials in {result['seconds']:.0f}s "
                        f"(bound {budget_s:.0f}s)")
    for col in ("settings", "tok/s (median, side by side)", "runs"):
        table.add_column(col)
    table.add_row("defaults " + json.dumps(result["defaults"]), f"{result['default_tok_per_s']:.1f}",
                  ", ".join(f"{x:.1f}" for x in result["default_runs"]))
    table.add_row("best " + json.dumps(result["best"]), f"{result['best_tok_per_s']:.1f}",
                  ", ".join(f"{x:.1f}" for x in result["best_runs"]))
    console.print(table)
    if result["best"] != result["search_winner"]:
        console.print(f"the search's winner {json.dumps(result['search_winner'])} did not beat the defaults "
                      "side by side: the defaults stay", highlight=False)
    if result["gain"] is not None:
        console.print(f"gain over the defaults: {result['gain']:+.1%}; config written to {path}")
    write_report({"bench": "tune", "model": model, "requests": len(reqs), **result}, json_path,
                 "bench-results/tune.json", console)


def _sync_chat(model: str):
    from llmos import LLM, SamplingParams

    llm = LLM(model)

    def chat(messages, schema) -> str:
        params = SamplingParams(max_tokens=96, temperature=0, json_schema=schema)
        return llm.chat([messages], params)[0].outputs[0].text

    return chat


def bench_operator(
    proposer: Annotated[str, typer.Option(
        help="Comma-separated: fallback (the deterministic policy), model (the led prompt: remedies named, "
             "answers narrowed to the finding), unled (the observation and the full action vocabulary).")]
    = "fallback,model,unled",
    model: Annotated[str, typer.Option("--model", "-m", help="The model proposing actions.")]
    = "smollm2-135m-instruct",
    trials: Annotated[int, typer.Option(help="Trials per fault kind, each with a drawn fault size.")] = 3,
    seed: Annotated[int, typer.Option(help="Seed of the fault sizes.")] = 0,
    window_s: Annotated[float, typer.Option(help="Seconds each fault may take to be detected and repaired.")]
    = 30.0,
    kernel: Annotated[bool, typer.Option(help="Also inject the kernel faults (agent over its quota, KV "
                                         "thrashing).")] = True,
    json_path: Annotated[str | None, typer.Option("--json", help="Where to write the JSON results.")] = None,
) -> None:
    """Chaos benchmark on the operator's default rules: faults of drawn sizes, one at a time, in a sandbox.

    Example: llmos bench operator --proposer fallback --trials 2
    """
    from llmos.bench.operator import PROPOSERS, BenchConfig, run_operator_bench

    names = tuple(n.strip() for n in proposer.split(",") if n.strip())
    if not names or set(names) - set(PROPOSERS):
        fail(f"--proposer takes a comma-separated list of {', '.join(PROPOSERS)}, got {proposer!r}")
    if trials < 1:
        fail(f"--trials must be at least 1, got {trials}")
    run_operator_bench(console, names, model=model, json_path=json_path,
                       config=BenchConfig(trials=trials, seed=seed, window_s=window_s), kernel=kernel)


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    app.add_typer(operator_app, name="operator")
    app.command("tune")(tune)
    bench_app.command("operator")(bench_operator)
