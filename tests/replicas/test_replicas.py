"""Two engine replicas on a local Ray behind the real server: placement, prefix routing, failover.

One Ray and one pool for the module (starting Ray and two engines is most of its time); each test sets
the router's policy it needs. Requests go through the real HTTP server with the official openai client;
what each replica did is read from the replicas' own engine counters.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import ray

from llmos.commands.kernel import agents_view
from llmos.engine import SamplingParams
from llmos.replicas import ReplicaPool
from llmos.server.system import boot
from tests.server.test_service import Served

MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[Served]:
    pool = ReplicaPool(MODEL, 2, kv_budget="16MiB", cpus_per_replica=1)
    s = Served(boot(tmp_path_factory.mktemp("home"), pool=pool))
    yield s
    s.close()  # closes the system, which stops the replicas and the Ray it started


def _pool(served: Served) -> ReplicaPool:
    return served.system.llm


def _client(served: Served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.url + "/v1", api_key="none", max_retries=0, timeout=120)


def _replica_counters(served: Served) -> list[dict]:
    return served.run(_pool(served).stats())["replicas"]


def test_requests_through_the_api_are_served_by_both_replicas(served: Served) -> None:
    pool, client = _pool(served), _client(served)
    pool.router.policy = "prefix"  # no prompt shares a block here: it balances by load
    before = [r["requests_finished"] for r in _replica_counters(served)]

    def ask(i: int) -> str:
        r = client.completions.create(model=MODEL, prompt=f"{i} apples and {i} pears are", max_tokens=12,
                                      temperature=0)
        return r.choices[0].text

    with ThreadPoolExecutor(6) as ex:
        texts = list(ex.map(ask, range(6)))
    assert all(texts)
    after = _replica_counters(served)
    done = [a["requests_finished"] - b for a, b in zip(after, before, strict=True)]
    assert sum(done) == 6 and min(done) >= 1, done  # both replicas' own engines served some

    # streaming goes through end to end: the same greedy text, in pieces
    whole = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=10, temperature=0)
    pieces = [c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="The sky is", max_tokens=10, temperature=0, stream=True)]
    assert len(pieces) > 1 and "".join(pieces) == whole.choices[0].text

    metrics = httpx.get(served.url + "/metrics").text
    assert 'llmos_replica_up{replica="0"} 1.0' in metrics and 'llmos_replica_up{replica="1"} 1.0' in metrics
    assert 'llmos_replica_kv_blocks_used{replica="1"}' in metrics
    assert "llmos_requests_finished_total" in metrics  # the pool's totals under the engine's names

    # the dashboard and `llmos top` show each replica: its queues, KV and what the router sent it
    snap = httpx.get(served.url + "/v1/dashboard/snapshot").json()
    rows = snap["replicas"]["replicas"]
    assert snap["replicas"]["router"] == "prefix" and [r["replica"] for r in rows] == [0, 1]
    assert all(r["up"] == 1 and r["kv_blocks_total"] > 0 and r["served"] >= 1 for r in rows), rows
    assert sum(r["routed"] for r in rows) == sum(r["served"] for r in rows)
    status = served.run(served.system.kernel.stats())
    lines = [ln for ln in agents_view([], status, "").renderables[-1].plain.splitlines()
             if ln.startswith("replica ")]
    assert [ln.split(" (")[0] for ln in lines] == ["replica 0", "replica 1"]
    assert all("(up, pid " in ln and "routed " in ln for ln in lines), lines


def _conversation_hits(served: Served, policy: str, system_prompt: str) -> list[int]:
    """Four turns on one long system prompt, one after another; each replica's new prefix-cache hits."""
    pool, client = _pool(served), _client(served)
    pool.router.policy = policy
    before = [r["prefix_cache_hits"] for r in _replica_counters(served)]
    for question in ("What is a river?", "Name a fruit.", "Say hello.", "Count to three."):
        client.chat.completions.create(model=MODEL, max_tokens=4, temperature=0, messages=[
            {"role": "system", "content": system_prompt}, {"role": "user", "content": question}])
    return [r["prefix_cache_hits"] - b for r, b in zip(_replica_counters(served), before, strict=True)]


def test_prefix_aware_routing_sends_a_shared_prefix_to_the_replica_holding_it(served: Served) -> None:
    facts = " ".join(f"Fact {i}: the {w} is {c}." for i, (w, c) in enumerate(
        zip(["sea", "sun", "grass", "snow", "night", "rose", "lime", "coal"] * 4,
            ["blue", "yellow", "green", "white", "dark", "red", "sour", "black"] * 4, strict=True)))
    prompt_tokens = len(_pool(served).tokenizer.encode(facts))
    assert prompt_tokens > 200

    prefix = _conversation_hits(served, "prefix", "You are the prefix assistant. " + facts)
    assert sorted(prefix)[0] == 0 and max(prefix) >= 3 * 192  # all turns on one replica, each hit it

    rr = _conversation_hits(served, "round-robin", "You are the round-robin assistant. " + facts)
    assert min(rr) > 0  # the prefix was computed on both replicas
    assert sum(prefix) >= sum(rr) + 192  # one prefill fewer (of at least 12 blocks) with prefix routing


def test_a_killed_replica_loses_no_whole_request_and_ends_its_streams_with_an_error(served: Served) -> None:
    pool, client = _pool(served), _client(served)
    pool.router.policy = "round-robin"  # streams and whole requests on both replicas
    old_pid = pool.pids[0]
    sent = [threading.Event(), threading.Event()]

    def in_flight() -> int:
        return sum(r.in_flight for r in pool.router.replicas)

    def wait_for(condition) -> None:
        deadline = time.monotonic() + 120
        while not condition():
            assert time.monotonic() < deadline
            time.sleep(0.01)

    def whole(i: int) -> int:
        r = client.completions.create(model=MODEL, prompt=f"Story {i}:", max_tokens=48, temperature=0,
                                      extra_body={"ignore_eos": True})
        return r.usage.completion_tokens

    def stream(i: int) -> str:
        try:
            chunks = client.completions.create(model=MODEL, prompt=f"Song {i}:", max_tokens=120, stream=True,
                                               temperature=0, extra_body={"ignore_eos": True})
            for chunk in chunks:
                if chunk.choices and chunk.choices[0].text:
                    sent[i].set()
        except openai.APIError as e:
            return f"error: {e}"
        return "ok"

    with ThreadPoolExecutor(8) as ex:
        streams = []
        for i in range(2):  # one after the other: round-robin puts one stream on each replica
            streams.append(ex.submit(stream, i))
            wait_for(lambda i=i: in_flight() == i + 1)
        wait_for(lambda: all(e.is_set() for e in sent))  # both streams have sent text
        wholes = [ex.submit(whole, i) for i in range(6)]
        wait_for(lambda: in_flight() == 8)  # every whole request is on a replica, 3 on each
        ray.kill(pool.actors[0], no_restart=False)  # a crash: Ray restarts the actor
        assert [w.result(timeout=300) for w in wholes] == [48] * 6  # every whole request completed
        ends = [s.result(timeout=300) for s in streams]
    errors = [e for e in ends if e != "ok"]
    assert len(errors) == 1, ends  # round-robin put one stream on each replica
    assert "engine replica 0 died after this stream had sent output" in errors[0]

    served.run(pool.wait_up(), timeout=300)
    assert pool.restarts[0] == 1 and pool.pids[0] != old_pid and pool.router.replicas[0].up
    before = _replica_counters(served)[0]["requests_finished"]
    for i in range(2):  # round-robin: one of these runs on the restarted replica
        client.completions.create(model=MODEL, prompt=f"After {i}", max_tokens=4, temperature=0)
    assert _replica_counters(served)[0]["requests_finished"] == before + 1


def test_an_agents_calls_stick_to_the_replica_it_started_on(served: Served) -> None:
    pool = _pool(served)
    pool.router.policy = "prefix"
    replicas = pool.router.replicas

    async def agent(sys, go: asyncio.Event) -> None:
        await sys.llm_generate("Hi!", max_tokens=2)  # no full block: only its session can place it
        await go.wait()
        await sys.llm_generate("Again?", max_tokens=2)
        await sys.llm_generate("More?", max_tokens=2)

    def routed() -> list[int]:
        return [r.routed for r in replicas]

    async def run() -> tuple[list[int], list[int]]:
        busy = asyncio.ensure_future(pool.generate_final([5] * 8, SamplingParams(max_tokens=320,
                                                                                 ignore_eos=True)))
        await asyncio.sleep(0.05)
        assert [r.in_flight for r in replicas] == [1, 0]  # replica 0 is busy: the agent starts on 1
        start, go = routed(), asyncio.Event()
        pid = await served.system.kernel.spawn(agent, "sticky", args={"go": go})
        while sum(routed()) == sum(start) or replicas[1].in_flight:  # its first call has run
            await asyncio.sleep(0.02)
        first = [a - b for a, b in zip(routed(), start, strict=True)]
        busy.cancel()
        await asyncio.gather(busy, return_exceptions=True)
        assert [r.in_flight for r in replicas] == [0, 0]  # both idle: least-loaded alone would pick 0
        go.set()
        await served.system.kernel.wait(pid)
        return first, [a - b for a, b in zip(routed(), start, strict=True)]

    first, total = served.run(run(), timeout=120)
    assert (first, total) == ([0, 1], [0, 3])


def test_the_default_single_engine_does_not_import_ray(tmp_path) -> None:
    code = f"""
import asyncio, sys
import llmos.cli  # every command registered, as `llmos serve` runs
from llmos.server import create_app
from llmos.server.system import boot
system = boot({str(tmp_path)!r}, model={MODEL!r}, kv_budget="16MiB")
create_app(system=system)
asyncio.run(system.aclose())
print(sorted(m for m in sys.modules if m == "ray" or m.startswith("ray.")))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"

