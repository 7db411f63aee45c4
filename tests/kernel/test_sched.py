"""Each policy's order on deterministic scenarios: which call runs at which tick.

The simulated engine generates one token per running call per tick; the
timeline lists the running calls at each tick ('-' when none).
"""

import string

import pytest

from llmos.kernel.sched import AgentScheduler, LengthPredictor, LLMCall, SchedulerSettings


def simulate(settings: dict, arrivals: dict[int, str], lengths: dict[str, int], ticks: int,
             priority: dict[str, int] | None = None, weight: dict[str, float] | None = None,
             sched: AgentScheduler | None = None) -> str:
    sched = sched or AgentScheduler(SchedulerSettings(**settings))
    timeline = []
    for t in range(ticks):
        for cid in arrivals.get(t, ""):
            sched.submit(LLMCall(cid, ord(cid), (priority or {}).get(cid, 0), (weight or {}).get(cid, 1.0),
                                 lengths[cid]))
        sched.schedule()
        timeline.append("".join(sorted(c.call_id for c in sched.running)) or "-")
        for call in list(sched.running):
            sched.progress(call, call.generated + 1)
            if call.generated >= lengths[call.call_id]:
                sched.finish(call)
    return " ".join(timeline)


def test_fifo_runs_in_arrival_order_and_never_preempts():
    got = simulate(dict(policy="fifo", max_running=2), {0: "ABC"}, dict(A=3, B=3, C=2), 7)
    assert got == "AB AB AB C C - -"


def test_rr_rotates_after_each_quantum():
    got = simulate(dict(policy="rr", max_running=1, quantum=2), {0: "AB"}, dict(A=4, B=4), 9)
    assert got == "A A B B A A B B -"


def test_rr_keeps_running_when_nobody_waits():
    got = simulate(dict(policy="rr", max_running=2, quantum=1), {0: "AB"}, dict(A=3, B=3), 4)
    assert got == "AB AB AB -"


def test_priority_preempts_for_a_more_urgent_call():
    got = simulate(dict(policy="priority", max_running=1), {0: "A", 2: "B"}, dict(A=5, B=2), 8,
                   priority=dict(A=1, B=0))
    assert got == "A A B B A A A -"


def test_fair_share_follows_the_weights():
    got = simulate(dict(policy="fair", max_running=1, quantum=2), {0: "AB"}, dict(A=30, B=30), 24,
                   weight=dict(A=2.0, B=1.0))
    assert got == "A A A A A B B B B A A A A A A A A B B B B A A A"
    assert got.split().count("A") == 2 * got.split().count("B")


def test_fair_admits_a_newcomer_quickly():
    lengths = dict(A=40, B=40, C=2)
    got = simulate(dict(policy="fair", max_running=2, quantum=4), {0: "AB", 10: "C"}, lengths, 14)
    assert got == "AB AB AB AB AB AB AB AB AB AB AC AC AB AB"  # C preempts B on arrival


def test_sjf_runs_the_shortest_waiting_call_first():
    got = simulate(dict(policy="sjf", max_running=1), {0: "X", 1: "LS"}, dict(X=3, L=6, S=2), 12)
    assert got == "X X X S S L L L L L L -"


def test_priority_aging_prevents_starvation():
    urgent = string.ascii_lowercase  # a new urgent call every 2 ticks keeps the queue busy
    arrivals = {0: "L" + urgent[0]} | {2 * i: urgent[i] for i in range(1, len(urgent))}
    lengths = {"L": 3} | dict.fromkeys(urgent, 2)
    prio = {"L": 5} | dict.fromkeys(urgent, 0)
    starved = simulate(dict(policy="priority", max_running=1, aging=10**6), arrivals, lengths, 50, prio)
    assert "L" not in starved
    aged = simulate(dict(policy="priority", max_running=1, aging=4), arrivals, lengths, 50, prio).split()
    # L waits 20 ticks (5 levels x 4), then wins the tie by age and runs to the end unpreempted.
    assert aged.index("L") == 20 and aged[20:23] == ["L", "L", "L"]


def test_a_held_agent_leaves_the_engine_and_comes_back():
    sched = AgentScheduler(SchedulerSettings("fifo", max_running=1))
    a, b = LLMCall("A", 1), LLMCall("B", 2)
    sched.submit(a)
    sched.submit(b)
    assert sched.schedule() == ([a], [])
    sched.hold(1)
    assert sched.schedule() == ([b], [a])
    sched.finish(b)
    assert sched.schedule() == ([], [])  # A stays out while its agent is suspended
    sched.release(1)
    assert sched.schedule() == ([a], [])


def test_the_predictor_learns_each_agents_lengths():
    p = LengthPredictor(alpha=0.5)
    assert p.predict(1, 256) == 128  # no history: half the budget
    p.observe(1, 128, 10)
    p.observe(1, 10, 30)
    assert p.predict(1, 256) == 20  # EWMA of 10 then 30
    assert p.predict(2, 256) == pytest.approx(0.2 * 30 + 0.8 * 10)  # a new agent gets the overall mean
    assert p.predict(1, 8) == 8  # never more than max_tokens
    assert p.errors == [118, 20]


def test_configure_changes_settings_and_names_bad_ones():
    sched = AgentScheduler()
    assert sched.configure(policy="rr", quantum=4) == {"policy": "fifo", "quantum": 16}
    assert sched.settings.policy == "rr"
    with pytest.raises(ValueError, match="unknown scheduling policy 'lottery'"):
        sched.configure(policy="lottery")
    with pytest.raises(ValueError, match="unknown scheduler setting"):
        sched.configure(speed=2)
    with pytest.raises(ValueError, match="max_running must be at least 1"):
        sched.configure(max_running=0)


def test_sjf_preempts_a_long_call_for_a_much_shorter_one():
    lengths = dict(L=12, S=2)
    got = simulate(dict(policy="sjf", max_running=1, quantum=2), {0: "L", 3: "S"}, lengths, 15)
    assert got == "L L L S S L L L L L L L L L -"  # S (predicted 1) beats L's remaining 12 - 3


def simulate_programs(settings: dict, programs: dict[str, tuple[int, list[int], int]], ticks: int) -> str:
    """Programs as the kernel sees them: (arrival tick, each call's length, tool ticks between calls).

    A program's next call is submitted `tool` ticks after its previous one finished; the
    timeline shows which program's call runs at each tick."""
    sched = AgentScheduler(SchedulerSettings(**settings))
    ready = {name: start for name, (start, _, _) in programs.items()}
    left = {name: list(lengths) for name, (_, lengths, _) in programs.items()}
    timeline = []
    for t in range(ticks):
        for name in sorted(ready):
            if ready[name] == t and left[name]:
                sched.submit(LLMCall(f"{name}{len(left[name])}", ord(name), max_tokens=left[name][0]))
                del ready[name]
        sched.schedule()
        timeline.append("".join(sorted(c.call_id[0] for c in sched.running)) or "-")
        for call in list(sched.running):
            sched.progress(call, call.generated + 1)
            name = call.call_id[0]
            if call.generated >= left[name][0]:
                sched.finish(call)
                left[name].pop(0)
                ready[name] = t + 1 + programs[name][2]
    return " ".join(timeline)


def test_las_runs_a_newcomers_first_call_before_a_long_programs_next_call():
    # A has had 4 tokens of service (level 1 with a quantum of 2) when its second call and
    # newcomer B's first (level 0) arrive together.
    programs = {"A": (0, [4, 4], 0), "B": (4, [3], 0)}
    assert simulate_programs(dict(policy="fifo", max_running=1), programs, 12) == "A A A A A A A A B B B -"
    got = simulate_programs(dict(policy="las", max_running=1, quantum=2), programs, 12)
    assert got == "A A A A B B B A A A A -"


def test_las_levels_double_and_age():
    sched = AgentScheduler(SchedulerSettings(policy="las", quantum=4, aging=10))
    call = LLMCall("x", 1)
    sched.submit(call)
    levels = []
    for served in (0, 3, 4, 11, 12, 27, 28, 60):
        sched.attained[1] = served
        levels.append(sched.level(call))
    assert levels == [0, 0, 1, 1, 2, 2, 3, 4]  # thresholds 4, 12, 28, 60: quantum x (2^k - 1)
    call.waited = 25
    assert sched.level(call) == 2  # two levels lifted by 25 ticks of waiting


def test_las_runs_programs_of_one_level_depth_first_in_arrival_order():
    # Three programs arrive together, each 3 calls of 2 tokens with a 1-tick tool between calls.
    programs = {"A": (0, [2, 2, 2], 1), "B": (0, [2, 2, 2], 1), "C": (0, [2, 2, 2], 1)}
    fifo = simulate_programs(dict(policy="fifo", max_running=1), programs, 20).split()
    las = simulate_programs(dict(policy="las", max_running=1, quantum=100), programs, 20).split()
    assert " ".join(fifo) == "A A B B C C A A B B C C A A B B C C - -"  # every program advances together
    assert " ".join(las) == "A A B B A A B B A A B B C C - C C - C C"  # A's next call before C's first

    def done(timeline: list[str]) -> list[int]:
        return [max(i for i, c in enumerate(timeline) if c == name) + 1 for name in "ABC"]

    assert done(fifo) == [14, 16, 18] and done(las) == [10, 12, 20]  # mean completion 16 -> 14


def test_las_counts_service_across_all_of_a_programs_calls():
    # B's calls are short but many: after 6 tokens it has more service than C, which goes first.
    programs = {"B": (0, [2, 2, 2, 2], 0), "C": (6, [3], 0)}
    got = simulate_programs(dict(policy="las", max_running=1, quantum=1), programs, 12)
    assert got == "B B B B B B C C C B B -"


def test_las_preempts_a_program_of_a_higher_level_once_it_ran_a_quantum():
    programs = {"A": (0, [10], 0), "B": (3, [2], 0)}
    got = simulate_programs(dict(policy="las", max_running=1, quantum=2), programs, 12)
    assert got == "A A A B B A A A A A A A"  # B (level 0) arrives at tick 3; A has 3 tokens: level 1
    same_level = simulate_programs(dict(policy="las", max_running=1, quantum=16), programs, 13)
    assert same_level == "A A A A A A A A A A B B -"  # both in level 0: FCFS, no preemption


def test_las_aging_lets_a_long_program_finish_under_a_stream_of_newcomers():
    newcomers = string.ascii_lowercase  # a new one-call program every 2 ticks keeps the engine busy
    programs = {"L": (0, [2, 2, 2], 0)} | {c: (2 * i, [2], 0) for i, c in enumerate(newcomers)}
    starved = simulate_programs(dict(policy="las", max_running=1, quantum=1, aging=10**6), programs, 60)
    assert [i for i, c in enumerate(starved.split()) if c == "L"] == [0, 52, 53, 55, 56, 57]
    aged = simulate_programs(dict(policy="las", max_running=1, quantum=1, aging=4), programs, 60).split()
    # Each 4 ticks of waiting lift L a level: it gets a token every few newcomers and ends at tick 23.
    assert [i for i, c in enumerate(aged) if c == "L"] == [0, 4, 8, 13, 22, 23]


def test_the_operator_may_set_every_kernel_policy():
    from llmos.agents.operator.actions import POLICIES as OPERATOR_POLICIES
    from llmos.agents.operator.guardrails import SETTING_BOUNDS
    from llmos.kernel.sched import POLICIES

    assert OPERATOR_POLICIES == POLICIES and "las" in SETTING_BOUNDS["policy"]
