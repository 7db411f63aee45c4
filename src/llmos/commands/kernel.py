"""`llmos run | ps | top | kill`: boot a kernel with agents, and watch or signal it from elsewhere.

`ps`, `top` and `kill` talk to the running server of the llmos home (found
through its server.json, or `--url`) when there is one, and read the process
table of the home otherwise.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Annotated, Any

import typer
from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from llmos.commands._common import console, err, fail

UrlOpt = Annotated[str | None, typer.Option("--url", envvar="LLMOS_URL",
                                            help="A running llmos server (default: the llmos home's).")]
KeyOpt = Annotated[str | None, typer.Option("--api-key", envvar="LLMOS_API_KEY",
                                            help="Key for the server (default: the home's local key).")]


class ServerClient:
    """The kernel API of a running llmos server, as this terminal's user sees it."""

    def __init__(self, url: str, key: str | None) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        """The JSON answer; an error answer or an unreachable server is one red line."""
        import httpx

        try:
            r = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as e:
            fail(f"the llmos server at {self.url} did not answer: {e}")
        if r.status_code >= 400:
            try:
                message = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = r.text[:200]
            fail(f"{message} (HTTP {r.status_code} from {self.url})")
        return r.json()


def server_client(url: str | None = None, key: str | None = None) -> ServerClient | None:
    """The running server to talk to: `url`, else the one the llmos home names; None when none runs."""
    from llmos.home import llmos_home
    from llmos.server.system import find_server

    info = find_server(llmos_home())
    if url is None and info is None:
        return None
    if url is None and not _answers(info["url"]):
        return None  # a server.json whose pid now belongs to another program: no server runs
    same = info is not None and (url is None or url.rstrip("/") == info["url"])
    return ServerClient(url or info["url"], key or (info.get("local_key") if same else None))


def _answers(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/health", timeout=5).status_code < 500
    except httpx.HTTPError:
        return False

_STATE_STYLE = {"running": "green", "ready": "yellow", "waiting": "cyan", "blocked": "blue",
                "suspended": "magenta", "terminated": "dim", "new": "white"}


def _parse_args(pairs: list[str]) -> dict[str, Any]:
    """KEY=VALUE pairs; a VALUE that parses as JSON (numbers, lists, true) is taken as such."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.isidentifier():
            fail(f"--arg takes KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _accepted(program: Any, args: dict[str, Any]) -> dict[str, Any]:
    """The subset of `args` that `program` takes (each --arg goes to the agents that know it)."""
    import inspect

    params = inspect.signature(program).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return dict(args)
    return {k: v for k, v in args.items() if k in params}


def _check_programs(programs: list[tuple[str, Any]], args: dict[str, Any]) -> None:
    """Before anything boots: every `main` is an async function and every --arg is a parameter of at
    least one of the programs (a misspelled one is named, with the parameters there are)."""
    import difflib
    import inspect

    for name, main in programs:
        if not inspect.iscoroutinefunction(getattr(main, "run", main)):
            fail(f"{name}: `main` must be an async function: `async def main(sys, ...)`")
    known: dict[str, None] = {}
    for _, main in programs:
        params = inspect.signature(main).parameters
        if any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return  # a program that takes **kwargs takes any --arg
        known.update((k, None) for k in list(params)[1:])
    for key in args:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            fail(f"unknown --arg {key!r}{hint} ({', '.join(n for n, _ in programs)} "
                 f"take{'s' if len(programs) == 1 else ''}: {', '.join(known) or 'no arguments'})")


def _agent_traceback(exc: BaseException) -> str:
    """The traceback of an agent's exception, its own frames only (not the kernel's)."""
    import traceback
    from pathlib import Path

    import llmos.kernel

    kernel_dir = str(Path(llmos.kernel.__file__).parent)
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(kernel_dir)]
    return "".join(["Traceback (most recent call last):\n", *traceback.format_list(frames),
                     *traceback.format_exception_only(exc)]).rstrip()


def _wide() -> bool:
    """Room for the per-program columns (prompt tokens reused, engine and tool seconds, retention)."""
    return console.width >= 120


def agents_view(rows: list[dict[str, Any]], status: dict[str, Any] | None, title: str,
                wide: bool = True) -> Group:
    """The live view: one row per agent (with, for a live one and when `wide`, its program stats:
    prompt tokens reused of all, seconds waiting for the engine and in tools, KV retention
    decisions), then the engine and scheduler line. Narrow terminals get the first columns whole."""
    programs = {p["pid"]: p for p in (status or {}).get("programs", [])} if wide else {}
    table = Table(title=title, title_justify="left", expand=False)
    program_cols = ("reused", "engine s", "tool s", "kv retention") if wide else ()
    for col in ("pid", "name", "state", "tokens", "tools", "syscall", *program_cols, "exit"):
        table.add_column(col, justify="right" if col in ("pid", "tokens", "tools", "reused", "engine s",
                                                         "tool s") else "left")
    for r in rows:
        state = r["state"]
        prog = r.get("program") or programs.get(r["pid"])
        if prog and wide:
            prompt = prog["prompt_tokens_reused"] + prog["prompt_tokens_computed"]
            kv = " ".join(f"{k} {v}" for k, v in sorted(prog["retention"].items()))
            shown: tuple[str, ...] = (f"{prog['prompt_tokens_reused']}/{prompt}", f"{prog['llm_s']:.1f}",
                                      f"{prog['tool_s']:.1f}", kv)
        else:
            shown = ("",) * len(program_cols)
        table.add_row(str(r["pid"]), r["name"], Text(state, style=_STATE_STYLE.get(state, "")),
                      str(r["tokens_used"] or 0), str(r["tool_calls"] or 0), r["current_syscall"] or "",
                      *shown, r["exit_reason"] or "")
    if not status:
        return Group(table)
    engine = status.get("engine", {})
    line = (f"policy {status.get('policy')} (max running {status.get('max_running')}, quantum "
            f"{status.get('quantum')})  |  scheduler: {status.get('sched_running', 0)} running, "
            f"{status.get('sched_waiting', 0)} waiting, {status.get('sched_preemptions', 0)} preemptions")
    if "kv_blocks_total" in engine:
        line += (f"\nengine: batch {engine.get('num_running', 0)}, waiting {engine.get('num_waiting', 0)}, "
                 f"paused {engine.get('num_paused', 0)}, swapped {engine.get('num_swapped', 0)}  |  "
                 f"KV blocks {engine.get('kv_blocks_used', 0)} used / {engine.get('kv_blocks_free', 0)} free"
                 f"  |  {engine.get('generation_tokens', 0)} tokens generated")
    for r in engine.get("replicas", []):  # an engine pool (`llmos serve --replicas N`)
        line += (f"\nreplica {r['replica']} ({'up' if r['up'] else 'DOWN'}, pid {r.get('pid')}): "
                 f"batch {r.get('num_running', 0)}, waiting {r.get('num_waiting', 0)}, in flight "
                 f"{r['in_flight']}  |  KV blocks {r.get('kv_blocks_used', 0)} / "
                 f"{r.get('kv_blocks_total', 0)}"
                 f"  |  routed {r['routed']}, served {r['served']}, restarts {r['restarts']}, prefix hits "
                 f"{r.get('prefix_cache_hits', 0)} / {r.get('prefix_cache_queries', 0)}")
    if "kv_retained_contexts" in engine:
        line += (f"\nKV across tool calls: {engine['kv_retained_contexts']} contexts retained "
                 f"({engine.get('kv_retained_blocks', 0)} blocks pinned)  |  decisions: keep "
                 f"{engine.get('kv_retention_kept', 0)}, swap {engine.get('kv_retention_swapped', 0)}, "
                 f"release {engine.get('kv_retention_released', 0)}; expired "
                 f"{engine.get('kv_retention_expired', 0)}, reclaimed "
                 f"{engine.get('kv_retention_reclaimed', 0)}"
                 f"  |  {engine.get('kv_retention_reused_tokens', 0)} prompt tokens reused")
    return Group(table, Text(line, style="dim"))


def _backend(model: str, backend_url: str | None, api_key: str | None, backend_model: str | None,
             kv_budget: str):
    from llmos.kernel import EngineBackend, OpenAIBackend

    if backend_url:
        return OpenAIBackend(backend_url, api_key, backend_model)
    return EngineBackend(model, kv_budget=kv_budget)


def run(
    agents: Annotated[list[str], typer.Argument(help="Agent names (chat, react, memgpt, ...) or .py files.")],
    policy: Annotated[str, typer.Option(help="fifo, rr, priority, fair or sjf.")] = "fifo",
    model: Annotated[str, typer.Option("--model", "-m", help="Model of the embedded engine.")]
    = "smollm2-135m-instruct",
    backend_url: Annotated[str | None, typer.Option(help="Use an OpenAI-compatible server instead.")]
    = None,
    api_key: Annotated[str | None, typer.Option(envvar="OPENAI_API_KEY", help="Key for --backend-url.")]
    = None,
    backend_model: Annotated[str | None, typer.Option(help="Model name on --backend-url.")] = None,
    arg: Annotated[list[str] | None, typer.Option(help="KEY=VALUE for the agents (repeatable).")] = None,
    max_running: Annotated[int, typer.Option(help="LLM calls on the engine at once.")] = 8,
    quantum: Annotated[int, typer.Option(help="rr time slice / fair granularity, in tokens.")] = 16,
    kv_budget: Annotated[str, typer.Option(help="KV cache size: bytes (2GiB) or a fraction.")] = "0.5",
    live: Annotated[bool, typer.Option(help="Show the live process view while agents run.")] = True,
    grants: Annotated[str | None, typer.Option(help="Capability policy file (TOML or YAML) for the agents; "
                                               "default: own workdir, sandboxed shell/python, memory.")]
    = None,
    url: Annotated[str | None, typer.Option("--url", help="Run the agents here as remote programs of this "
                                            "llmos server (its kernel schedules and checks them).")] = None,
) -> None:
    """Boot a kernel and run agents on it concurrently; ends with a summary table.

    Example: llmos run chat react --policy fair
             llmos run --url http://127.0.0.1:8000 my_agent.py
    """
    from llmos.agents import AgentNotFound, load_program
    from llmos.engine import InvalidRequestError
    from llmos.kernel import POLICIES
    from llmos.models.config import ModelError
    from llmos.security import PolicyError, load_policy

    if policy not in POLICIES:
        fail(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
    if grants:
        try:
            load_policy(grants)  # read once now, so a bad file is one line before anything boots
        except PolicyError as e:
            fail(str(e))
    try:
        programs = [load_program(a) for a in agents]
    except AgentNotFound as e:
        fail(str(e))
    args = _parse_args(arg or [])
    _check_programs(programs, args)
    if url is not None:
        return _run_remote(url, programs, args)
    with console.status(f"booting the kernel on {backend_url or model} ..."):
        try:
            backend = _backend(model, backend_url, api_key, backend_model, kv_budget)
        except (ModelError, InvalidRequestError, ValueError) as e:
            fail(str(e))
    code = asyncio.run(_run(protected_kernel(backend, policy, max_running, quantum, grants), programs, args,
                            live))
    if code:
        raise typer.Exit(code)


def _run_remote(url: str, programs: list[tuple[str, Any]], args: dict[str, Any]) -> None:
    """`llmos run --url`: the programs run in this process, their syscalls in the server's kernel."""
    import inspect

    from llmos.kernel.remote import run_programs, server_key
    from llmos.security import default_capabilities

    ordinary = [g.model_dump(exclude_defaults=True) for g in default_capabilities(None).grants]
    specs = []
    for name, main in programs:  # a module's CAPABILITIES are asked for beside the ordinary grants
        extra = getattr(inspect.getmodule(main), "CAPABILITIES", None)
        specs.append((name, main, [*ordinary, *extra] if extra else None))
    for name, pid, outcome, result in asyncio.run(run_programs(url, server_key(url), specs, args)):
        if pid is None:
            fail(f"{name}: {outcome}")
        print(f"pid {pid} ({name}): {outcome}" + (f": {result!r}" if result is not None else ""))


def protected_kernel(backend, policy: str = "fifo", max_running: int = 8, quantum: int = 16,
                     grants: str | None = None):
    """A kernel with every built-in tool behind the reference monitor (capabilities, flow
    policy, audit log); agents get `grants` (a policy file) or the default capabilities."""
    from llmos.kernel import Kernel
    from llmos.security import AuditLog, ReferenceMonitor, default_capabilities, load_policy
    from llmos.tools import builtin_tools

    tools = builtin_tools()
    kernel = Kernel(backend, tools=tools, monitor=ReferenceMonitor(audit=AuditLog(), tools=tools),
                    policy=policy, max_running=max_running, quantum=quantum)
    kernel.default_capabilities = ((lambda workdir: load_policy(grants, workdir, kernel.home)) if grants
                                   else default_capabilities)
    return kernel


def _requested(kernel, main) -> Any:
    """An agent module may ask for more than the ordinary grants (`CAPABILITIES`, like an app's
    manifest); running it with `llmos run` is the user's consent, so say what it gets."""
    import inspect

    extra = getattr(inspect.getmodule(main), "CAPABILITIES", None)
    if not extra:
        return None  # the kernel gives the ordinary grants
    from llmos.security import Capabilities

    console.print(f"[yellow]granting {main.__module__}: {', '.join(g['tool'] for g in extra)}[/]")
    return Capabilities.of([*kernel.default_capabilities(None).grants, *extra])


async def _run(kernel, programs, args, live: bool) -> int:
    """Run the programs to their end; the exit status: 0 when every agent exited (or was killed by a
    user's signal), 130 after Ctrl-C, 1 when an agent crashed, failed its task or exceeded a quota
    (each crash shown with its traceback)."""
    from llmos.agents import TaskFailed

    interrupted = False
    kernel.on_output = lambda proc, text: console.print(f"[bold]\\[{proc.pid} {proc.name}][/] {text}",
                                                        markup=True, highlight=False)
    started = time.time()
    try:
        pids = [await kernel.spawn(main, name, args=_accepted(main, args),
                                   capabilities=_requested(kernel, main)) for name, main in programs]
        title = f"llmos kernel (boot {kernel.boot})"
        waiter = asyncio.gather(*(kernel.wait(p) for p in pids))
        if live:
            with Live(agents_view([], None, title, _wide()), console=console, refresh_per_second=4,
                      transient=True) as view:
                while not waiter.done():
                    rows = [p.info() for p in kernel.ps()]
                    view.update(agents_view(rows, await kernel.stats(), title, _wide()))
                    await asyncio.wait([waiter], timeout=0.25)
        await waiter
    except (KeyboardInterrupt, asyncio.CancelledError):
        interrupted = True
        console.print("[yellow]interrupted: ending the agents[/]")
    finally:
        await kernel.shutdown()
        summary = [p.info() for p in kernel.ps()]
        crashes = [(p, p.task.exception()) for p in kernel.ps()
                   if p.task is not None and p.task.done() and not p.task.cancelled()
                   and p.task.exception() is not None and p.exit_reason.startswith("error:")]
    for proc, exc in crashes:
        if isinstance(exc, TaskFailed):
            err.print(f"[bold red]agent {proc.pid} ({proc.name}) failed its task:[/] {exc}", highlight=False,
                      soft_wrap=True)
            continue
        err.print(f"[bold red]agent {proc.pid} ({proc.name}) crashed:[/]")
        print(_agent_traceback(exc), file=sys.stderr)  # unwrapped, as Python prints one
    elapsed = time.time() - started
    table = Table(title=f"summary: {len(summary)} agents in {elapsed:.1f} s", title_justify="left")
    for col in ("pid", "name", "exit", "tokens", "tools", "syscalls", "seconds"):
        table.add_column(col)
    for r in summary:
        table.add_row(str(r["pid"]), r["name"], r["exit_reason"] or r["state"], str(r["tokens_used"]),
                      str(r["tool_calls"]), str(r["syscalls"]),
                      f"{(r['ended'] or time.time()) - r['created']:.1f}")
    console.print(table)
    if interrupted:
        return 130
    # a kill the user sent (llmos kill) is their decision; a crash, a failed task or a quota is a failure
    return 0 if all(r["exit_reason"] == "exited" or (r["exit_reason"] or "").startswith("killed:")
                    for r in summary) else 1


def _table():
    from llmos.home import llmos_home
    from llmos.kernel import ProcessTable

    path = llmos_home() / "kernel.db"
    if not path.exists():
        fail(f"no kernel has run yet (no process table at {path})")
    return ProcessTable(path)


def _snapshot(table, show_all: bool) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    boots = table.live_boots()
    rows = table.processes(only_live=not show_all, limit=50)
    live_boots = {b["boot"] for b in boots}
    if not show_all:
        rows = [r for r in rows if r["boot"] in live_boots]
    return rows, (boots[-1]["status"] if boots else None)


def _remote_snapshot(client: ServerClient, show_all: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    rows = client.call("GET", "/v1/kernel/processes", params={"all": show_all})["data"]
    return rows, client.call("GET", "/v1/kernel/stats")


def ps(show_all: Annotated[bool, typer.Option("--all", "-a", help="Ended agents too.")] = False,
       url: UrlOpt = None, api_key: KeyOpt = None) -> None:
    """List agents: live ones of running kernels, or all with --all.

    Example: llmos ps --all
    """
    client = server_client(url, api_key)
    rows, _ = _remote_snapshot(client, show_all) if client else _snapshot(_table(), show_all)
    if not rows:
        console.print("[dim]no agents running (llmos ps --all shows ended ones)[/]")
        return
    console.print(agents_view(rows, None, "agents", _wide()))


def top(
    interval: Annotated[float, typer.Option(help="Seconds between refreshes.")] = 0.5,
    once: Annotated[bool, typer.Option(help="Print one snapshot and exit.")] = False,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
) -> None:
    """Live view of running kernels: agents, states, tokens, current syscall, engine batch and KV.

    Example: llmos top
    """
    client = server_client(url, api_key)
    if client is not None:
        def snapshot():
            return _remote_snapshot(client, False)
    else:
        table = _table()

        def snapshot():
            return _snapshot(table, False)
    if once:
        console.print(agents_view(*snapshot(), "llmos top", _wide()))
        return
    try:
        with Live(agents_view(*snapshot(), "llmos top", _wide()), console=console,
                  refresh_per_second=max(1, int(1 / interval))) as view:
            while True:
                time.sleep(interval)
                view.update(agents_view(*snapshot(), "llmos top (Ctrl-C leaves)", _wide()))
    except KeyboardInterrupt:
        pass


def kill(
    pid: Annotated[int, typer.Argument(help="The agent's pid (see llmos ps).")],
    signal: Annotated[str, typer.Option(help="kill, suspend or resume.")] = "kill",
    url: UrlOpt = None,
    api_key: KeyOpt = None,
) -> None:
    """Signal an agent of a running kernel (kill, suspend or resume).

    Example: llmos kill 7
    """
    if signal not in ("kill", "suspend", "resume"):
        fail(f"unknown signal {signal!r}; use kill, suspend or resume")
    client = server_client(url, api_key)
    if client is not None:
        proc = client.call("GET", f"/v1/kernel/processes/{pid}")
        out = client.call("POST", f"/v1/kernel/processes/{pid}/signal", json={"signal": signal})
        console.print(f"{pid} ({proc['name']}): {out['outcome']}")
        return
    table = _table()
    row = table.process(pid)
    if row is None:
        fail(f"no agent with pid {pid}")
    if row["state"] == "terminated":
        fail(f"agent {pid} ({row['name']}) has already ended: {row['exit_reason']}")
    sent = table.send_signal(pid, signal)
    deadline = time.monotonic() + 10
    while (outcome := table.signal_outcome(sent)) is None:
        if time.monotonic() > deadline:
            fail(f"the kernel running agent {pid} did not answer within 10 s")
        time.sleep(0.05)
    console.print(f"{pid} ({row['name']}): {outcome}")


def bench_sched(
    quick: Annotated[bool, typer.Option(help="Shrink the work (the tests' form).")] = False,
    model: Annotated[str, typer.Option("--model", "-m")] = "smollm2-135m-instruct",
    policy: Annotated[list[str] | None, typer.Option(help="Run only these policies (repeatable).")] = None,
    repeats: Annotated[int | None, typer.Option(min=1, help="Runs per policy, interleaved (default 3; "
                                                "quick 1).")] = None,
    output: Annotated[str | None, typer.Option("--json", help="Where to write the JSON results.")] = None,
) -> None:
    """Agent scheduling policies side by side: throughput, interactive latency, fairness.

    Example: llmos bench sched
    """
    from llmos.bench.sched import run_sched_bench
    from llmos.kernel import POLICIES

    bad = [p for p in policy or [] if p not in POLICIES]
    if bad:
        fail(f"unknown policy {bad[0]!r}; choose from {', '.join(POLICIES)}")
    run_sched_bench(console, quick=quick, model=model, json_path=output, policies=tuple(policy or POLICIES),
                    repeats=repeats)


def bench_service(
    quick: Annotated[bool, typer.Option(help="Fewer turns per agent (the demo's form).")] = False,
    model: Annotated[str, typer.Option("--model", "-m")] = "smollm2-135m-instruct",
    embedded: Annotated[bool, typer.Option(help="Run the embedded-model phase (8 clients).")] = True,
    output: Annotated[str | None, typer.Option("--json", help="Where to write the JSON results.")] = None,
) -> None:
    """The OS as a service under load: 8 clients on the embedded model, then 100 agents on a scripted
    model; messages/s, latency p50/p99, the API's own overhead, and no message lost or duplicated.

    Example: llmos bench service --quick
    """
    from llmos.bench.service import run_service_bench

    run_service_bench(console, quick=quick, model=model, json_path=output, embedded=embedded)


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    bench_app.command("sched")(bench_sched)
    bench_app.command("service")(bench_service)
    app.command()(run)
    app.command()(ps)
    app.command()(top)
    app.command()(kill)
