"""`llmos bench service`: the OS as a service under load, through its agents API over HTTP.

Two phases, each against one server running in its own process on
127.0.0.1 (clients in this process, so they do not share the server's
interpreter):

1. embedded: `llmos serve` with the embedded model; 8 clients each create
   their own agent and message it for a fixed number of turns, all at once;
2. scripted: the same server code whose model answers every step instantly
   with `send_message`: one client calling the app in this process (the
   API's own work per message, without TCP or a second process), one client
   alone over TCP, then 100 agents, each messaged by its own client, all at
   once.

Reported per phase: messages per second, latency per message p50/p99 (the
synchronous POST /v1/agents/{id}/messages, sent to answered), the server's
run time per message (the run's created to completed) and the API's own
overhead per message (latency minus run time: HTTP, auth, routing, the run's
bookkeeping, JSON both ways), and the check that no message was lost or
duplicated: every agent's history holds each sent message exactly once, in
the order sent, and every message got an assistant reply.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from llmos.kernel.api import ChatResult


@dataclass
class ServiceWorkload:
    clients: int = 8  # embedded phase: clients, each with its own agent
    turns: int = 4  # messages per embedded agent
    agents: int = 100  # scripted phase
    scripted_turns: int = 10  # messages per scripted agent
    alone_turns: int = 50  # scripted: one client alone first (the API's overhead without queueing)
    max_tokens: int = 96  # reply tokens per step on the embedded model (a send_message call needs 56)


QUICK = ServiceWorkload(clients=8, turns=2, agents=100, scripted_turns=3, alone_turns=30)


class InstantBackend:
    """A kernel backend whose model answers every step at once by calling send_message."""

    context_window = 8192
    model = "scripted"

    def __init__(self) -> None:
        self.steps = 0

    def attach(self, sched: Any, on_switch: Any) -> None:
        pass

    def count_tokens(self, messages: list[dict[str, Any]]) -> int:
        return sum(len(str(m.get("content") or "")) for m in messages) // 4

    async def complete(self, call: Any, prompt: Any, params: Any, on_tokens: Any) -> ChatResult:
        if params.json_schema is None:  # the summarizer
            return ChatResult("summary", "stop", 10, 1)
        self.steps += 1
        out = {"function": "send_message", "arguments": {"message": f"ok {self.steps}",
                                                         "request_heartbeat": False}}
        return ChatResult(json.dumps(out), "stop", self.count_tokens(prompt), 10)

    async def run_in_scheduler(self, fn: Any) -> Any:
        return fn()

    async def stats(self) -> dict[str, Any]:
        return {"backend": "scripted", "steps": self.steps}

    def close(self) -> None:
        pass


def serve_scripted(home: str, port: int) -> None:
    """The server of the scripted phase (run in its own process by the bench)."""
    import uvicorn

    from llmos.server import create_app
    from llmos.server.system import boot

    system = boot(home, backend=InstantBackend(), policy="fair")
    server = uvicorn.Server(uvicorn.Config(create_app(system=system), host="127.0.0.1", port=port,
                                           log_level="warning"))

    async def run() -> None:
        async def announce() -> None:
            while not server.started:
                await asyncio.sleep(0.02)
            system.publish(f"http://127.0.0.1:{port}")

        announcer = asyncio.create_task(announce())
        try:
            await server.serve()
        finally:
            announcer.cancel()
            await system.aclose()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    asyncio.run(run())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """A server process on a fresh llmos home; its URL and local key come from server.json."""

    def __init__(self, argv: list[str], home: Path, timeout: float = 300) -> None:
        from llmos.server.system import find_server

        env = {**os.environ, "LLMOS_HOME": str(home)}
        env.pop("LLMOS_API_KEY", None)
        self.log = open(home / "server.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(argv, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while (info := find_server(home)) is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not start: {(home / 'server.log').read_text()[-2000:]}")
            time.sleep(0.1)
        self.url, self.key = info["url"], info["local_key"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def _ok(r: Any) -> Any:
    """The response's JSON, or an error naming what the server said."""
    if r.status_code >= 400:
        raise RuntimeError(f"{r.request.method} {r.request.url.path}: HTTP {r.status_code}: {r.text[:500]}")
    return r.json()


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


async def _client(http: Any, index: int, turns: int, max_tokens: int | None,
                  samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Create an agent, message it `turns` times in order, then read back its history."""
    body: dict[str, Any] = {"name": f"bench-{index}", "memory_blocks": [
        {"label": "persona", "value": "I am a helpful assistant. I answer in one short sentence."},
        {"label": "human", "value": f"Client number {index}."}]}
    if max_tokens:
        body["max_tokens"] = max_tokens
    agent = _ok(await http.post("/v1/agents/", json=body))["id"]
    sent, replied = [], 0
    for t in range(turns):
        text = f"[client {index} turn {t}] What is {index} plus {t}?"
        started = time.perf_counter()
        r = await http.post(f"/v1/agents/{agent}/messages",
                            json={"messages": [{"role": "user", "content": text}]})
        latency = time.perf_counter() - started
        reply = _ok(r)
        sent.append(text)
        replied += any(m["message_type"] == "assistant_message" for m in reply["messages"])
        samples.append({"agent": agent, "latency": latency, "run": reply["usage"]["run_ids"][0],
                        "stop": reply["stop_reason"]["stop_reason"]})
    return {"agent": agent, "sent": sent, "replied": replied}


async def _history(http: Any, agent: str) -> list[str]:
    r = await http.get(f"/v1/agents/{agent}/messages", params={"limit": 100_000, "order": "asc"})
    return [m["content"] for m in _ok(r) if m["message_type"] == "user_message"]


async def _phase(url: str, key: str, clients: int, turns: int, max_tokens: int | None) -> dict[str, Any]:
    """`clients` clients on a server over TCP."""
    import httpx

    # idle connections close before the server's keep-alive timeout (5 s), so none is reused as it closes
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4,
                          keepalive_expiry=1.0)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=600,
                                 limits=limits) as http:
        return await _measure(http, clients, turns, max_tokens)


async def _in_process_phase(turns: int) -> dict[str, Any]:
    """One client calling the scripted server's app in this process (no TCP, no second process):
    the API's own work per message, apart from the machine's network stack and scheduler."""
    import httpx

    from llmos.server import create_app
    from llmos.server.system import boot

    with tempfile.TemporaryDirectory(prefix="llmos-bench-service-") as tmp:
        system = boot(tmp, backend=InstantBackend(), policy="fair")
        try:
            transport = httpx.ASGITransport(app=create_app(system=system))
            async with httpx.AsyncClient(transport=transport, base_url="http://llmos", timeout=600) as http:
                return await _measure(http, 1, turns, None)
        finally:
            await system.aclose()


async def _measure(http: Any, clients: int, turns: int, max_tokens: int | None) -> dict[str, Any]:
    samples: list[dict[str, Any]] = []
    started = time.perf_counter()
    results = await asyncio.gather(*(_client(http, i, turns, max_tokens, samples)
                                     for i in range(clients)))
    elapsed = time.perf_counter() - started
    lost = duplicated = out_of_order = 0
    for res in results:
        history = await _history(http, res["agent"])
        found = [h for h in history if h in res["sent"]]
        lost += sum(1 for s in res["sent"] if s not in found)
        duplicated += len(found) - len(set(found))
        out_of_order += int(list(dict.fromkeys(found)) != [s for s in res["sent"] if s in found])
    run_s = {}
    for s in samples:  # the server's own time for each run (not timed: after the load)
        run = _ok(await http.get(f"/v1/runs/{s['run']}"))
        run_s[s["run"]] = (run["total_duration_ns"] or 0) / 1e9
    latencies = [s["latency"] for s in samples]
    overheads = [s["latency"] - run_s[s["run"]] for s in samples]
    messages = len(samples)
    return {
        "clients": clients, "turns": turns, "messages": messages, "seconds": round(elapsed, 3),
        "messages_per_s": round(messages / elapsed, 2),
        "latency_ms": {"p50": _ms(_percentile(latencies, 50)), "p99": _ms(_percentile(latencies, 99))},
        "run_ms": {"p50": _ms(_percentile(list(run_s.values()), 50))},
        "api_overhead_ms": {"p50": _ms(_percentile(overheads, 50)), "p99": _ms(_percentile(overheads, 99)),
                            "mean": _ms(statistics.fmean(overheads))},
        "replied": sum(r["replied"] for r in results),
        "lost": lost, "duplicated": duplicated, "out_of_order_agents": out_of_order,
        "stop_reasons": sorted({s["stop"] for s in samples}),
    }


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def report_table(report: dict[str, Any], names: list[str]) -> Table:
    """The phases side by side, one metric a row (fits an 80-column terminal)."""
    table = Table("", *names, title="llmos bench service (latencies in ms)", title_justify="left")
    rows = [("agents", lambda r: str(r["clients"])), ("messages", lambda r: str(r["messages"])),
            ("messages/s", lambda r: f"{r['messages_per_s']:.2f}"),
            ("latency p50", lambda r: f"{r['latency_ms']['p50']:.1f}"),
            ("latency p99", lambda r: f"{r['latency_ms']['p99']:.1f}"),
            ("run p50", lambda r: f"{r['run_ms']['p50']:.1f}"),
            ("API overhead p50", lambda r: f"{r['api_overhead_ms']['p50']:.2f}"),
            ("API overhead p99", lambda r: f"{r['api_overhead_ms']['p99']:.2f}"),
            ("replied", lambda r: f"{r['replied']}/{r['messages']}"),
            ("lost / dup", lambda r: f"{r['lost']} / {r['duplicated']}"),
            ("out of order", lambda r: str(r["out_of_order_agents"]))]
    for label, cell in rows:
        table.add_row(label, *(cell(report[n]) for n in names))
    return table


def run_service_bench(console: Console, *, quick: bool = False, model: str = "smollm2-135m-instruct",
                      json_path: str | None = None, embedded: bool = True,
                      workload: ServiceWorkload | None = None) -> dict[str, Any]:
    from llmos.bench.engine import write_report

    w = workload or (QUICK if quick else ServiceWorkload())
    report: dict[str, Any] = {"workload": w.__dict__, "model": model}
    servers = []  # (server, [(phase name, clients, turns, reply tokens)])
    if embedded:
        servers.append(([sys.executable, "-m", "llmos.cli", "serve", "--model", model, "--port", "{port}",
                         "--policy", "fair", "--kv-budget", "0.5"],
                        [("embedded", w.clients, w.turns, w.max_tokens)]))
    servers.append(([sys.executable, "-m", "llmos.bench.service", "{home}", "{port}"],
                    [("scripted 1 client", 1, w.alone_turns, None),
                     (f"scripted {w.agents} agents", w.agents, w.scripted_turns, None)]))
    with console.status(f"scripted, in process: 1 client x {w.alone_turns} messages ..."):
        report["scripted in-process"] = asyncio.run(_in_process_phase(w.alone_turns))
    for argv, phases in servers:
        with tempfile.TemporaryDirectory(prefix="llmos-bench-service-") as tmp:
            home, port = Path(tmp), _free_port()
            with console.status("starting the server ..."):
                server = _Server([a.format(port=port, home=home) for a in argv], home)
            try:
                for name, clients, turns, max_tokens in phases:
                    with console.status(f"{name}: {clients} clients x {turns} messages ..."):
                        report[name] = asyncio.run(_phase(server.url, server.key, clients, turns, max_tokens))
            finally:
                server.stop()
    names = ["scripted in-process"] + [name for _, phases in servers for name, *_ in phases]
    table = report_table(report, names)
    console.print(table)
    write_report(report, json_path, "docs/bench/service.json", console)
    return report


if __name__ == "__main__":  # the scripted phase's server: python -m llmos.bench.service HOME PORT
    serve_scripted(sys.argv[1], int(sys.argv[2]))
