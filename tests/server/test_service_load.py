"""Load and ordering on one server: many clients on many agents, a busy agent's messages queued in
order, and `llmos bench service`'s measuring loop (no message lost or duplicated)."""

import asyncio
import io
import json
import sys
import time

import httpx
from rich.console import Console

from llmos.bench.service import (
    ServiceWorkload,
    _free_port,
    _in_process_phase,
    _phase,
    _Server,
    run_service_bench,
)
from tests.server.scripted_server import ScriptedBackend
from tests.server.test_service import Served


def test_many_clients_on_many_agents_lose_and_duplicate_nothing(tmp_path):
    argv = [sys.executable, "-m", "llmos.bench.service", str(tmp_path), str(_free_port())]
    server = _Server(argv, tmp_path)
    try:
        r = asyncio.run(_phase(server.url, server.key, clients=20, turns=3, max_tokens=None))
    finally:
        server.stop()
    counts = (r["messages"], r["replied"], r["lost"], r["duplicated"], r["out_of_order_agents"])
    assert counts == (60, 60, 0, 0, 0)
    assert r["stop_reasons"] == ["end_turn"]
    assert 0 < r["api_overhead_ms"]["p50"] < r["latency_ms"]["p50"]
    assert not (tmp_path / "server.json").exists()  # the server shut down cleanly


def test_the_apis_own_overhead_per_message_is_under_5_ms():
    r = asyncio.run(_in_process_phase(turns=30))  # the scripted model: the run itself is the agent loop
    assert (r["messages"], r["replied"], r["lost"], r["duplicated"]) == (30, 30, 0, 0)
    assert 0 < r["api_overhead_ms"]["p50"] < 5.0, r


def test_a_busy_agents_messages_queue_behind_it_in_order(tmp_path):
    from llmos.server.system import boot

    served = Served(boot(tmp_path, backend=ScriptedBackend(delay=0.3)))
    try:
        with served.client() as http:
            agent = http.post("/v1/agents/", json={"name": "busy"}).json()["id"]
            runs = []
            for i in range(4):  # sent one after another; each returns at once with its run
                r = http.post(f"/v1/agents/{agent}/messages/async",
                              json={"messages": [{"role": "user", "content": f"message {i}"}]})
                assert r.status_code == 200, r.text
                runs.append(r.json()["id"])
            states = [http.get(f"/v1/runs/{run}").json()["status"] for run in runs]
            assert states[0] in ("created", "running") and states[1:] == ["created"] * 3  # queued
            assert http.get(f"/v1/runs/{runs[3]}").json()["metadata"] == {"queued": True}
            deadline = time.monotonic() + 60
            while http.get(f"/v1/runs/{runs[-1]}").json()["status"] != "completed":
                assert time.monotonic() < deadline
                time.sleep(0.1)
            done = [http.get(f"/v1/runs/{run}").json() for run in runs]
            assert [d["status"] for d in done] == ["completed"] * 4
            ends = [d["completed_at"] for d in done]
            assert ends == sorted(ends)  # one after another, in the order they were sent
            history = http.get(f"/v1/agents/{agent}/messages", params={"order": "asc", "limit": 1000}).json()
            users = [m["content"] for m in history if m["message_type"] == "user_message"]
            assert users == [f"message {i}" for i in range(4)]
            assert sum(m["message_type"] == "assistant_message" for m in history) == 4
    finally:
        served.close()


def test_concurrent_synchronous_messages_to_one_agent_each_get_their_own_reply(tmp_path):
    from llmos.server.system import boot

    served = Served(boot(tmp_path, backend=ScriptedBackend(delay=0.05)))

    async def main():
        async with httpx.AsyncClient(base_url=served.url, timeout=120) as http:
            agent = (await http.post("/v1/agents/", json={"name": "shared"})).json()["id"]

            async def send(i: int):
                await asyncio.sleep(0.01 * i)  # arrival order 0, 1, 2, ...
                r = await http.post(f"/v1/agents/{agent}/messages",
                                    json={"messages": [{"role": "user", "content": f"m{i}"}]})
                return r.json()

            replies = await asyncio.gather(*(send(i) for i in range(6)))
            history = (await http.get(f"/v1/agents/{agent}/messages",
                                      params={"order": "asc", "limit": 1000})).json()
            return replies, history

    try:
        replies, history = asyncio.run(main())
    finally:
        served.close()
    runs = [r["usage"]["run_ids"][0] for r in replies]
    assert len(set(runs)) == 6
    assert all(any(m["message_type"] == "assistant_message" for m in r["messages"]) for r in replies)
    users = [m["content"] for m in history if m["message_type"] == "user_message"]
    assert users == [f"m{i}" for i in range(6)]


def test_bench_service_writes_its_report(tmp_path):
    out = io.StringIO()
    work = ServiceWorkload(agents=5, scripted_turns=2, alone_turns=4)
    run_service_bench(Console(file=out, width=80), embedded=False, workload=work,
                      json_path=str(tmp_path / "service.json"))
    report = json.loads((tmp_path / "service.json").read_text())
    assert [report[p]["messages"] for p in ("scripted in-process", "scripted 1 client",
                                            "scripted 5 agents")] == [4, 4, 10]
    assert all(report[p]["lost"] == report[p]["duplicated"] == 0 for p in report if p.startswith("scripted"))
    text = out.getvalue()
    assert "API overhead p50" in text and "lost / dup" in text and max(map(len, text.splitlines())) <= 80
