"""Commands of protection: `llmos audit verify|tail` and `llmos bench security`."""

from __future__ import annotations

import sqlite3
from typing import Annotated

import typer

from llmos.commands._common import console, fail
from llmos.commands.kernel import KeyOpt, UrlOpt, server_client

DbOpt = Annotated[str | None, typer.Option("--db", help="Audit database (default: LLMOS_HOME/audit.db).")]


def _audit(db: str | None):
    from pathlib import Path

    from llmos.security.audit import AuditError, AuditLog, default_audit_path

    path = Path(db) if db else default_audit_path()
    if not path.exists():
        fail(f"no audit log at {path}")
    try:
        return AuditLog(path)
    except (AuditError, sqlite3.DatabaseError) as e:
        fail(f"cannot open the audit log {path}: {e}")


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    audit_app = typer.Typer(no_args_is_help=True,
                            help="The reference monitor's audit log (keyed hash chain, anchored).")
    app.add_typer(audit_app, name="audit")

    @audit_app.command("verify")
    def audit_verify(db: DbOpt = None, url: UrlOpt = None, api_key: KeyOpt = None,
                     min_rows: Annotated[int | None, typer.Option(
                         "--min-rows", min=0, help="Fail unless the log holds at least this many rows: a "
                         "count recorded earlier where the log's writers cannot write (catches a rollback "
                         "of the database together with its anchor).")] = None) -> None:
        """Check the keyed hash chain and its anchor; exit 1 if TAMPERED (rows edited, inserted, forged or
        removed, anchor or key changed) or DAMAGED (not a readable audit log). With --url: the server
        at that URL checks its own log (an admin key)."""
        from pathlib import Path

        if url is not None and db is None:
            out = server_client(url, api_key).call("GET", "/v1/kernel/audit/verify")
            if out["ok"]:
                console.print(f"[green]ok[/]: {out['message']}")
                return
            where = f" at row {out['row']}" if out.get("row") is not None else ""
            console.print(f"[bold red]{out.get('status', 'TAMPERED')}[/]{where}: {out['message']}",
                          highlight=False)
            raise typer.Exit(1)

        from llmos.security.audit import anchor_path_of, default_audit_path, verify_file

        path = Path(db) if db else default_audit_path()
        if not path.exists() and not anchor_path_of(path).exists():
            fail(f"no audit log at {path}")
        verdict = verify_file(path)
        if verdict.ok and min_rows is not None and verdict.rows < min_rows:
            verdict = verdict._replace(ok=False, status="TAMPERED", row=verdict.rows + 1, message=(
                f"the log holds {verdict.rows} rows, fewer than the {min_rows} recorded earlier "
                "(the database and its anchor were rolled back together)"))
        if verdict.ok:
            console.print(f"[green]ok[/]: {verdict.message}")
            return
        where = f" at row {verdict.row}" if verdict.row is not None else ""
        console.print(f"[bold red]{verdict.status}[/]{where}: {verdict.message}", highlight=False)
        raise typer.Exit(1)

    @audit_app.command("tail")
    def audit_tail(n: Annotated[int, typer.Option("-n", min=1, help="How many rows.")] = 20,
                   db: DbOpt = None, url: UrlOpt = None, api_key: KeyOpt = None) -> None:
        """The last decisions: time, agent, tool, decision, reason (from the running server when there
        is one: a user's key shows that user's rows)."""
        import datetime

        from rich.table import Table

        table = Table("id", "time", "agent", "tool", "decision", "reason", "args")
        client = server_client(url, api_key) if db is None else None
        try:
            rows = (client.call("GET", "/v1/kernel/audit", params={"limit": n})["data"] if client
                    else _audit(db).tail(n))
        except sqlite3.DatabaseError as e:
            fail(f"the audit log is damaged: {e} (llmos audit verify says more)")
        for r in rows:
            colour = {"allow": "green", "deny": "red"}.get(r["decision"], "dim")
            table.add_row(str(r["id"]), datetime.datetime.fromtimestamp(r["ts"]).strftime("%H:%M:%S"),
                          r["agent"], r["tool"], f"[{colour}]{r['decision']}[/]", r["reason"],
                          r["args_preview"][:60])
        console.print(table)

    @bench_app.command("security")
    def bench_security(
        suite: Annotated[list[str] | None, typer.Option("--suite", help="AgentDojo suite(s): workspace, "
                                                        "travel, banking, slack (default: all).")] = None,
        quick: Annotated[bool, typer.Option(help="Only the first 5 user tasks of each suite.")] = False,
        escapes: Annotated[bool, typer.Option(help="Run the sandbox escape suite.")] = True,
        agentdojo: Annotated[bool, typer.Option(help="Run the AgentDojo replay.")] = True,
        output: Annotated[str | None, typer.Option("--json", help="Where to write the JSON results.")] = None,
        planner: Annotated[bool, typer.Option(
            help="Only reading (b): the planner agent end to end on a model, on a sample of pairs "
                 "(JSON: bench-results/security_planner.json).")] = False,
        limit: Annotated[int, typer.Option(min=1, help="--planner: pairs per suite.")] = 12,
        injections: Annotated[int, typer.Option(min=1, help="--planner: injection tasks per sampled user "
                                                "task.")] = 3,
        seed: Annotated[int, typer.Option(help="--planner: seed of the sample.")] = 0,
        retries: Annotated[int, typer.Option(min=0, help="--planner: rewrites of a failed plan.")] = 0,
        model: Annotated[str, typer.Option("--model", "-m", help="--planner: the embedded engine's model (a "
                                           "name or a GGUF file).")] = "smollm2-135m-instruct",
        backend_url: Annotated[str | None, typer.Option(help="--planner: an OpenAI-compatible server instead."
                                                        )] = None,
        api_key: Annotated[str | None, typer.Option(envvar="OPENAI_API_KEY", help="Key for --backend-url.")]
        = None,
        backend_model: Annotated[str | None, typer.Option(help="Model name on --backend-url.")] = None,
    ) -> None:
        """AgentDojo through the reference monitor (benign and compromised replays) and sandbox escapes.

        utility: benign user tasks whose calls all pass and whose check holds; ASR: attack success of
        the compromised replay over the pairs whose injection attacks something (rules: the flow rules
        alone on true origins; bound: who decided each call labelled by the replay, what a perfect
        planner would reach; no monitor: every call allowed); labels: no tool treated as trusted ever
        returned injected text.
        """
        from rich import box
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        from rich.table import Column, Table

        from llmos.bench.engine import write_report
        from llmos.bench.security import SUITES, agentdojo_work, run_adversarial, run_agentdojo
        from llmos.security.escapes import run_escape_suite
        from llmos.security.sandbox import describe_isolation

        bad = [s for s in suite or [] if s not in SUITES]
        if bad:
            fail(f"unknown suite(s) {bad}; choose from {list(SUITES)}")
        if planner:
            _bench_planner(suite, limit, injections, seed, retries, model, backend_url, api_key,
                           backend_model, output)
            return
        report: dict = {"isolation": describe_isolation()}
        if agentdojo:
            try:
                import agentdojo as _  # noqa: F401
            except ImportError:
                fail("AgentDojo is not installed: pip install agentdojo (or run with --no-agentdojo)")
            limit = 5 if quick else None
            with Progress(TextColumn("AgentDojo replay"), BarColumn(), MofNCompleteColumn(),
                          TimeElapsedColumn(), console=console) as bar:
                task = bar.add_task("replay", total=agentdojo_work(suite, limit))
                result = run_agentdojo(suite, limit, progress=lambda n: bar.advance(task, n))
            report["agentdojo"] = result
            table = Table(Column("suite", no_wrap=True), "tasks", "pairs", "left\nout", "rules\nutility",
                          "rules\nASR", "bound\nutility", "bound\nASR", "no mon.\nASR",
                          box=box.SIMPLE_HEAD, pad_edge=False,
                          title=f"{result['benchmark']}: llmos reference monitor")
            for r in result["suites"]:
                table.add_row(r["suite"], str(r["user_tasks"]), str(r["pairs"]), str(r["pairs_excluded"]),
                              f"{r['rules']['benign_utility']:.1%}", f"{r['rules']['attack_success']:.1%}",
                              f"{r['bound']['benign_utility']:.1%}", f"{r['bound']['attack_success']:.1%}",
                              f"{r['no_monitor']['attack_success']:.1%}")
            console.print(table)
            wrong = [r["suite"] for r in result["suites"] if not r["canary"]["ok"]]
            verdict = f"[red]WRONG in {', '.join(wrong)}[/]" if wrong else "ok"
            console.print(f"labels: {verdict} (no tool treated as trusted ever returned injected text)")
            console.print(f"pairs: {result['pairs']} user/injection pairs that attack something; "
                          f"{result['pairs_excluded']} more pair an injection task with no calls and no "
                          "answer (nothing to attack) and are left out.\n"
                          "rules: the monitor's flow rules alone, every value labelled by where it really "
                          "came from, no label for who decided a call: what the monitor itself achieves.\n"
                          "bound: the replay labels the user as deciding the user task's calls and the "
                          "injection as deciding the injection's, so every injected side effect is refused "
                          "by construction: the bound a perfect planner would reach, not a measured agent.\n"
                          "planner: the planner agent end to end on a model is measured on a sample by "
                          "`llmos bench security --planner` (a model run: minutes per suite on a CPU).",
                          markup=False, highlight=False)
        if escapes:
            with console.status("sandbox escape suite ..."):
                outcomes = run_escape_suite()
            report["escapes"] = [o.__dict__ for o in outcomes]
            table = Table("escape", "result", "detail", "wall s", title=f"sandbox ({outcomes[0].mode})")
            for o in outcomes:
                table.add_row(o.name, "[green]contained[/]" if o.contained else "[bold red]ESCAPED[/]",
                              o.detail, f"{o.wall_s:.2f}")
            console.print(table)
        report["adversarial"] = run_adversarial(report.get("escapes"))
        table = Table("class", "cases tried", "held", title="adversarial classes (issue 13)")
        for r in report["adversarial"]:
            colour = "green" if r["held"] == r["tried"] else "bold red"
            table.add_row(r["class"], str(r["tried"]), f"[{colour}]{r['held']}[/]")
        console.print(table)
        write_report(report, output, "docs/bench/security.json", console)


def _bench_planner(suites: list[str] | None, limit: int, injections: int, seed: int, retries: int, model: str,
                   backend_url: str | None, api_key: str | None, backend_model: str | None,
                   output: str | None) -> None:
    """Reading (b): the planner agent on a seeded sample of pairs, printed per suite and written as JSON."""
    from rich import box
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from llmos.bench.engine import write_report
    from llmos.bench.security_planner import planner_work, run_planner_bench
    from llmos.commands.kernel import _backend

    try:
        import agentdojo as _  # noqa: F401
    except ImportError:
        fail("AgentDojo is not installed: pip install agentdojo")
    name = f"{backend_model or 'default model'} at {backend_url}" if backend_url else model
    with console.status(f"loading {name} ..."):
        backend = _backend(model, backend_url, api_key, backend_model, "0.5")
    try:
        with Progress(TextColumn("planner on AgentDojo"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console) as bar:
            task = bar.add_task("runs", total=planner_work(suites, limit, seed, injections))
            result = run_planner_bench(backend, name, suites, limit, seed, lambda n: bar.advance(task, n),
                                       retries, injections)
    finally:
        backend.close()
    table = Table("suite", "user tasks", "pairs", "valid plans", "runs denied", "utility",
                  "utility w/o\nvacuous", "utility\nattacked", "ASR", "audit", box=box.SIMPLE_HEAD,
                  title=f"{result['benchmark']}: {result['model']}")

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{x:.1%}"

    for r in result["suites"]:
        table.add_row(r["suite"], str(r["user_tasks"]), f"{r['pairs']} of {r['pairs_in_suite']}",
                      f"{r['plans_valid']}/{r['runs']}", str(r["runs_denied"]),
                      f"{pct(r['utility'])} ({r['utility_passed']})", pct(r["utility_without_vacuous"]),
                      pct(r["utility_under_attack"]),
                      f"{pct(r['attack_success'])} ({r['attacks']})",
                      f"{r['audit']['rows']} rows, {'ok' if r['audit']['verified'] else 'TAMPERED'}")
    console.print(table)
    console.print(f"all: utility {pct(result['utility'])} over {result['user_tasks']} user tasks, attack "
                  f"success {pct(result['attack_success'])} over {result['pairs']} pairs; "
                  f"{result['plans_valid']} of {result['runs']} runs had a valid plan; {result['wall_s']} s. "
                  f"Sample: {result['sample']['how']} (seed {seed}). Vacuous: user tasks whose AgentDojo "
                  "utility check holds on the untouched environment with no answer.", markup=False,
                  highlight=False)
    write_report(result, output, "docs/bench/security_planner.json", console)
