"""`llmos bench operator`: the documented default rules, drawn fault sizes, both prompts, real faults."""

import asyncio
import json

from rich.console import Console

from llmos.agents.operator import ACTION_SCHEMA, FallbackPolicy, LLMProposer, Observer
from llmos.agents.operator.detect import Finding
from llmos.agents.operator.propose import _SYSTEM
from llmos.bench.operator import (
    BenchConfig,
    UnledProposer,
    _on_target,
    draw_sizes,
    rule_line,
    run_chaos,
    summary,
)


def test_the_bench_uses_the_documented_lines():
    assert [rule_line(k) for k in ("runaway_cpu", "memory_hog", "scratch_full", "over_quota")] == \
        [80.0, 512.0, 256.0, 0.9]
    assert rule_line("kv_thrashing", "llmos.num_swapped") == 0.5
    own_lines = {"cpu_percent", "rss_mb", "scratch_mb", "preemption_rate"}
    assert not own_lines & set(BenchConfig.__dataclass_fields__)  # no line of its own to set


def test_fault_sizes_are_seeded_draws_that_straddle_the_lines():
    cfg = BenchConfig(trials=40)
    sizes = draw_sizes(cfg)
    assert sizes == draw_sizes(BenchConfig(trials=40)) and sizes != draw_sizes(BenchConfig(trials=40, seed=1))
    hogs = [s["mb"] for s in sizes["memory_hog"]]
    fills = [s["mb"] for s in sizes["scratch_full"]]
    duties = [s["duty"] for s in sizes["runaway_cpu"]]
    assert min(hogs) < 512 < max(hogs) and min(fills) < 256 < max(fills) and min(duties) < 0.8 < max(duties)
    # the fallback multiplies the KV cap by 4: some drawn caps stay below the ~25 blocks an agent needs
    # times the agents, so one step does not always fix the thrashing
    assert any(4 * s["kv_blocks"] < 25 * s["agents"] for s in sizes["kv_thrashing"])
    assert any(4 * s["kv_blocks"] >= 25 * s["agents"] for s in sizes["kv_thrashing"])
    assert all(cfg.thrash_blocks[0] <= s["kv_blocks"] <= cfg.thrash_blocks[1] for s in sizes["kv_thrashing"])


def test_the_unled_prompt_shows_the_observation_and_the_full_vocabulary():
    seen = {}

    async def chat(messages, schema):
        seen["messages"], seen["schema"] = messages, schema
        return json.dumps({"kind": "kill_process", "pid": 4242, "reason": "a pid it was never shown"})

    async def go():
        obs = await Observer().sample()
        finding = Finding("memory_hog", "pid:7", "proc.7.rss_mb", 900.0, 512.0, "rule")
        unled = await UnledProposer(chat).propose(finding, obs, [])
        led_messages = LLMProposer(chat).prompt(finding, obs, [])
        return unled, led_messages

    action, led = asyncio.run(go())
    assert seen["schema"] == ACTION_SCHEMA  # nothing narrowed: any kind, any target
    assert action.kind == "kill_process" and action.pid == 4242  # so a wrong target is possible
    system, user = seen["messages"][0]["content"], json.loads(seen["messages"][1]["content"])
    assert led[0]["content"] == _SYSTEM and "kill a process that burns CPU" in _SYSTEM
    assert "kill a process" not in system and "more KV blocks" not in system  # no remedy named
    assert set(user) == {"finding", "observation"} and "host" in user["observation"]


def test_summary_counts_actions_below_the_line_and_off_target_as_false():
    row = {"kind": "memory_hog", "over_line": True, "detected": True, "repaired": True, "steps": 1,
           "refused": [], "other_actions": [], "off_target": []}
    below = {**row, "over_line": False, "detected": True, "repaired": False, "steps": 1,
             "other_actions": [{"subject": "pid:1"}]}
    missed = {**row, "detected": False, "repaired": False, "steps": 1, "off_target": [{"kind": "renice"}]}
    s = summary({"faults": [row, below, missed]})["memory_hog"]
    assert s == {"trials": 3, "over_line": 2, "detected": 1, "repaired": 1, "steps_when_repaired": [1],
                 "detected_below_line": 1, "false_actions": 2, "off_target": 1, "refused": 0}


def test_an_action_on_another_target_than_the_finding_is_off_target():
    assert _on_target("pid:12", {"kind": "kill_process", "pid": 12})
    assert not _on_target("pid:12", {"kind": "renice_process", "pid": 13})
    assert not _on_target("pid:12", {"kind": "kill_agent", "pid": 12})  # an agent, not the process
    assert _on_target("agent:3", {"kind": "suspend_agent", "pid": 3})
    assert _on_target("path:/s", {"kind": "remove_files", "path": "/s/dump"})
    assert not _on_target("path:/s", {"kind": "remove_files", "path": "/s"})  # the directory itself
    assert not _on_target("path:/s", {"kind": "remove_files", "path": "/scratch2/x"})
    assert not _on_target("path:/s", {"kind": "renice_process", "pid": 7})
    assert _on_target("llmos", {"kind": "set_setting", "name": "kv_blocks", "value": 9})


def test_a_short_chaos_run_on_real_faults(tmp_path):
    """One trial of each host fault with the fallback: a spinning core (over the line when the shared
    machine lets it), a 320 MB hog (below the 512 MB line: nothing may be done to it) and a 300 MB
    scratch fill (over 256 MB: its largest entry is removed)."""
    cfg = BenchConfig(trials=1, warmup_s=1.0, quiet_s=3.0, cpu_duty=(1.0, 1.0), hog_mb=(320, 320),
                      fill_mb=(300, 300))
    run = asyncio.run(run_chaos(FallbackPolicy(), cfg, Console(file=open(tmp_path / "log", "w"))))
    rows = {r["kind"]: r for r in run["faults"]}
    assert set(rows) == {"runaway_cpu", "memory_hog", "scratch_full"}
    assert run["no_fault"]["false_actions"] == []
    hog, fill, spin = rows["memory_hog"], rows["scratch_full"], rows["runaway_cpu"]
    assert not hog["over_line"] and 300 < hog["peak"] < 512 and hog["steps"] == 0 and not hog["detected"], hog
    assert fill["over_line"] and fill["detected"] and fill["repaired"], fill
    assert [a["kind"] for a in fill["actions"]] == ["remove_files"]
    if spin["detected"]:  # on a loaded machine a busy loop may not get 80% of a core: then no rule fires
        assert spin["repaired"] and [a["kind"] for a in spin["actions"]] == ["kill_process"]
    assert all(not r["other_actions"] and not r["off_target"] for r in run["faults"])


def test_each_trial_has_its_own_approval_queue_and_window(tmp_path):
    """An action approved too late for its trial never runs in the next; a fault's window counts from
    when its measurement crossed the line."""
    from llmos.agents.operator import Grants, host_kernel
    from llmos.agents.operator.actions import KillProcess
    from llmos.bench.operator import Fault, _Run, _Sandbox

    async def go():
        sb = _Sandbox(tmp_path)
        kernel = host_kernel(home=tmp_path / "home", audit_path=tmp_path / "audit.db")
        try:
            run = _Run(BenchConfig(), sb, FallbackPolicy(), kernel, Grants(), Observer())
            first = await run.operator()
            first.approvals.decide(first.approvals.submit(KillProcess(pid=4242), {}))
            second = await run.operator()
            return second.approvals.take_approved(), first.approvals.path != second.approvals.path
        finally:
            await kernel.shutdown()

    leftover, distinct = asyncio.run(go())
    assert leftover == [] and distinct
    levels = iter([100.0, 300.0, 200.0])
    fault = Fault("scratch_full", "fill", {}, "path:/x", 0.0, lambda: None, lambda: True,
                  lambda: next(levels), 256.0, settle_s=1.0)
    fault.sample()
    assert fault.crossed is None and not fault.over_line
    fault.sample()
    crossed = fault.crossed
    fault.sample()
    assert crossed is not None and fault.crossed == crossed and fault.over_line and fault.peak == 300.0
