"""Lab `context`: a long conversation on a small context window, paged to recall storage (MemGPT).

The MemGPT agent (`llmos.agents.memgpt`, its main context
`llmos.memory.context.MainContext`) runs on the embedded model through the
kernel and is told a fact, then ordinary user turns (`llmos bench memory`'s
paging-in task, scripted), on a window so small that the fact is evicted long
before the question. The question's turn has a `run_first` tool rule: its
first call is `conversation_search` for the person's name (prefilled), so it
shows a page-in from recall storage whatever the small model would choose.

The lab watches the agent's real main context: before each step it notes the
queue's tokens (what memory pressure sees), then whether the step's
maintenance warned (past the warning fraction of the budget) or flushed
(evicted the oldest messages to recall storage and folded them into the
recursive summary with an LLM call), and the tokens of the prompt sent.
Measured: occupancy per step against the window, the warning and flush
thresholds, each flush (messages evicted, the summary it wrote), the largest
prompt the backend was sent with its reply against the window, and the
recall hit (the search result holding the evicted fact, and the reply).
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import textwrap
from pathlib import Path
from typing import Any

from llmos.lab._common import MODEL, engine, pyplot, save

SIZE: dict[str, dict[str, Any]] = {  # user turns between the fact and the question, sentences in each
    "small": {"turns": 3, "sentences": 3, "window": 640},
    "full": {"turns": 10, "sentences": 3, "window": 640},
}
REPLY_TOKENS = 56  # the least a send_message call needs (memgpt.MIN_REPLY_TOKENS)
SUMMARY_TOKENS = 48
SYSTEM = ("You are Sam, a persistent agent. Your context window is small: old messages are evicted to recall "
          "storage and summarized, and conversation_search finds them again. Core memory is always visible. "
          "The user only sees what you pass to send_message.")
WARNING_FRACTION = 0.7
FLUSH_FRACTION = 1.0
TOOLS = ["send_message", "conversation_search", "core_memory_append"]
AGENT = "sam"


def run(size: str, loaded: Any) -> dict[str, Any]:
    from llmos.bench.virtual_context import NAMES, paging_trials
    from llmos.engine import AsyncLLM
    from llmos.kernel import EngineBackend, Kernel
    from llmos.memory import open_store
    from llmos.tools.base import ToolRegistry
    from llmos.tools.memory import memory_tools

    p = SIZE[size]
    trial = paging_trials(1, p["turns"] * p["sentences"], seed=0)[0]
    k = p["sentences"]
    turns = [trial["fact"], *(" ".join(trial["filler"][i:i + k]) for i in range(0, len(trial["filler"]), k))]
    name = next(n for n in NAMES if n in trial["question"])
    tools = ToolRegistry()
    tools.register(*memory_tools())
    backend = EngineBackend(AsyncLLM(engine(loaded, 128)))
    with tempfile.TemporaryDirectory(prefix="llmos-lab-context-") as home:
        kernel = Kernel(backend, home=home, tools=tools)

        async def go() -> dict[str, Any]:
            try:
                pid = await kernel.spawn(_conversation, AGENT, args={
                    "turns": turns, "question": trial["question"], "query": name,
                    "window": p["window"]})
                out = await kernel.wait(pid)
                if kernel.process(pid).exit_reason != "exited":
                    raise RuntimeError(f"the agent ended with {kernel.process(pid).exit_reason}")
                return out
            finally:
                await kernel.shutdown()

        out = asyncio.run(go())
        store = open_store(Path(home))
        row = store.agent(AGENT)
        if row is None:
            raise RuntimeError(f"the lab's agent {AGENT!r} left no row in its memory store")
        fact_rows = store.query("SELECT in_context FROM messages WHERE agent = ? AND role = 'user' AND "
                                "content = ?", (AGENT, trial["fact"]))
        stored = store.query("SELECT count(*) FROM messages WHERE agent = ?", (AGENT,))[0][0]
        store.close()
    budget = p["window"] - REPLY_TOKENS
    reply = out["reply"] or ""
    return {"lab": "context", "size": size, "model": MODEL, "window": p["window"],
            "reply_tokens": REPLY_TOKENS, "budget": budget, "warning_tokens": WARNING_FRACTION * budget,
            "flush_tokens": FLUSH_FRACTION * budget, "summary_tokens": SUMMARY_TOKENS, "tools": TOOLS,
            "fact": trial["fact"], "question": trial["question"],
            "query": name, "answer": trial["answer"], "turns": out["turns"], "steps": out["steps"],
            "llm_calls": row["llm_calls"], "largest_prompt": row["largest_prompt"],
            "largest_prompt_plus_reply": row["largest_prompt"] + REPLY_TOKENS, "overflows": row["overflows"],
            "evictions": row["evictions"], "summaries": row["summaries"], "messages_stored": stored,
            "fact_evicted_before_question": out["fact_evicted_before_question"],
            "fact_in_recall_storage": len(fact_rows) == 1,
            "fact_in_context_at_end": bool(fact_rows and fact_rows[0][0]),
            "recall": out["recall"], "reply": reply,
            "reply_has_answer": all(v.lower() in reply.lower() for v in trial["answer"])}


async def _conversation(sys: Any, turns: list[str], question: str, query: str, window: int) -> dict[str, Any]:
    """The agent's turns, then the question; each step's main context observed on the way."""
    from llmos.agents import memgpt
    from llmos.agents.tool_rules import ToolRules

    common: dict[str, Any] = {
        "context_window": window, "reply_tokens": REPLY_TOKENS, "summary_tokens": SUMMARY_TOKENS,
        "warning_fraction": WARNING_FRACTION, "flush_fraction": FLUSH_FRACTION, "max_steps": 2,
        "tools": TOOLS, "max_string": 72, "system": SYSTEM}
    from llmos.agents.messages import ToolReturnMessage

    steps: list[dict[str, Any]] = []
    where = {"turn": 0}
    agent = memgpt.open_agent(sys, **common)
    _observe(agent.context, steps, where)
    for k, text in enumerate(turns):
        where["turn"] = k
        await agent.turn(text)
    evicted = agent.context.store.query("SELECT count(*) FROM messages WHERE agent = ? AND role = 'user' AND "
                                        "content = ? AND in_context = 0", (sys.name, turns[0]))[0][0] > 0
    # the question: its first call must search recall storage for the name (Letta's run_first rule)
    rules = ToolRules.from_letta([{"type": "run_first", "tool_name": "conversation_search",
                                   "args": {"query": query}}])
    asker = memgpt.open_agent(sys, tool_rules=rules, **common)
    where["turn"] = len(turns)
    _observe(asker.context, steps, where)
    turn = await asker.turn(question)
    results = [m.tool_return for m in turn.messages
               if isinstance(m, ToolReturnMessage) and m.name == "conversation_search"]
    found = results[0] if results else ""
    return {"steps": steps, "turns": len(turns) + 1, "fact_evicted_before_question": evicted,
            "recall": {"tool": "conversation_search", "query": query, "result": found,
                       "hit": turns[0] in found, "step": next((s["step"] for s in steps
                                                              if s["turn"] == len(turns)), None)},
            "reply": "\n".join(turn.replies) or None}


def _observe(ctx: Any, steps: list[dict[str, Any]], where: dict[str, int]) -> None:
    """Note, around each `prompt` the agent asks its main context for, what memory pressure did."""
    prompt = ctx.prompt

    def alerts() -> int:
        return ctx.store.query("SELECT count(*) FROM messages WHERE agent = ? AND role = 'system' AND "
                               "content LIKE '%Memory pressure%'", (ctx.agent,))[0][0]

    async def observed(summarize: Any) -> tuple[list[dict[str, str]], int]:
        before, warned = ctx.stats(), alerts()
        msgs, tokens = await prompt(summarize)
        after = ctx.stats()
        steps.append({"step": len(steps), "turn": where["turn"], "queue_tokens": before["tokens"],
                      "prompt_tokens": tokens,
                      "warning": alerts() > warned, "flushes": after["summaries"] - before["summaries"],
                      "evicted": after["evictions"] - before["evictions"], "in_context": after["in_context"],
                      "messages": after["messages"],
                      "summary": ctx.summary if after["summaries"] > before["summaries"] else None})
        return msgs, tokens

    ctx.prompt = observed


def plot(data: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    steps = data["steps"]
    fig, (ax, text_ax) = plt.subplots(2, 1, figsize=(16, 8.5), height_ratios=[2.8, 1])
    x = [s["step"] for s in steps]
    ax.plot(x, [s["queue_tokens"] for s in steps], "o--", color="#9e9e9e",
            label="main context before the step's maintenance (tokens)")
    ax.plot(x, [s["prompt_tokens"] for s in steps], "o-", color="#1565c0", label="prompt sent to the model")
    ax.plot(x, [s["prompt_tokens"] + data["reply_tokens"] for s in steps], "_", color="#1565c0",
            markersize=10, label=f"prompt + the {data['reply_tokens']} tokens kept for the reply")
    ax.axhline(data["window"], color="#000", lw=1.5)
    ax.text(x[0], data["window"] + 6, f"context window {data['window']}", fontsize=8)
    ax.axhline(data["flush_tokens"], color="#c62828", ls="--", lw=1)
    ax.text(x[0], data["flush_tokens"] + 6, f"flush threshold {data['flush_tokens']:.0f}", fontsize=8,
            color="#c62828")
    ax.axhline(data["warning_tokens"], color="#ef6c00", ls="--", lw=1)
    ax.text(x[0], data["warning_tokens"] + 6, f"warning threshold {data['warning_tokens']:.0f}", fontsize=8,
            color="#ef6c00")
    for s in steps:
        if s["warning"]:
            ax.plot(s["step"], s["queue_tokens"], marker="^", markersize=12, color="#ef6c00", ls="none")
        if s["flushes"]:
            ax.axvline(s["step"], color="#c62828", alpha=0.25, lw=6)
            ax.text(s["step"], 60, f"flush\n{s['evicted']} out", fontsize=7, color="#c62828", ha="center")
    recall = data["recall"]
    if recall["step"] is not None:
        s = steps[recall["step"]]
        ax.plot(s["step"], s["prompt_tokens"], marker="*", markersize=20, color="#2e7d32" if recall["hit"]
                else "#9e9e9e", ls="none", label="the question: conversation_search pages the fact back in"
                if recall["hit"] else "the question: the search did not find the fact")
    turns = sorted({s["turn"] for s in steps})
    for t in turns:
        first = next(s["step"] for s in steps if s["turn"] == t)
        ax.text(first, -35, "fact" if t == 0 else "Q" if t == turns[-1] else str(t), fontsize=7, ha="center",
                color="#555")
    ax.plot([], [], marker="^", color="#ef6c00", ls="none", label="memory-pressure warning to the agent")
    ax.plot([], [], color="#c62828", alpha=0.25, lw=6,
            label="flush: messages evicted to recall storage,\nfolded into the summary by an LLM call")
    ax.set_ylim(-50, max([data["window"]] + [s["queue_tokens"] for s in steps]) * 1.08)
    ax.set_xlabel("agent step (one LLM call of the agent; labels below: the user turn it belongs to)")
    ax.set_ylabel("tokens")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(f"llmos lab context: the MemGPT agent on {data['model']}, a {data['window']}-token window; "
                 f"{data['evictions']} messages evicted in {data['summaries']} flushes; largest prompt "
                 f"{data['largest_prompt']} + {data['reply_tokens']} reply <= {data['window']}; "
                 f"{data['overflows']} overflows", fontsize=10)
    text_ax.axis("off")
    summaries = [s for s in steps if s["summary"]]
    lines = [f"fact (turn 0): {data['fact']}",
             f"question (last turn): {data['question']}  ->  conversation_search({recall['query']!r}) "
             f"{'found the evicted fact' if recall['hit'] else 'did not find the fact'}; "
             f"reply: {(data['reply'] or '')[:90]!r}"]
    shown = summaries if len(summaries) <= 3 else summaries[:1] + summaries[-2:]  # the first and the last
    lines += [f"summary after the flush at step {s['step']} (the model's own words): "
              f"{' / '.join(s['summary'].split(chr(10)))[:200]}" for s in shown]
    wrapped = [w for line in lines for w in textwrap.wrap(line, 150, subsequent_indent="    ")]
    text_ax.text(0, 1, "\n".join(wrapped), fontsize=8, va="top", family="monospace")
    save(fig, path)


def describe(data: dict[str, Any]) -> str:
    r = data["recall"]
    lines = [f"the MemGPT agent on a {data['window']}-token window ({data['reply_tokens']} kept for the "
             f"reply): {data['turns']} user turns, {len(data['steps'])} agent steps, "
             f"{data['llm_calls']} LLM calls",
             f"  warning at {data['warning_tokens']:.0f} tokens: "
             f"{sum(s['warning'] for s in data['steps'])} warnings; flush at {data['flush_tokens']:.0f}: "
             f"{data['summaries']} flushes evicted {data['evictions']} messages to recall storage",
             f"  largest prompt {data['largest_prompt']} + {data['reply_tokens']} reply = "
             f"{data['largest_prompt_plus_reply']} <= {data['window']}; overflows: {data['overflows']}",
             f"  the fact ({data['fact']!r}) evicted before the question: "
             f"{data['fact_evicted_before_question']}",
             f"  question {data['question']!r}: conversation_search({r['query']!r}) found it in recall "
             f"storage: {r['hit']}; reply {data['reply']!r} (holds the answer {data['answer']}: "
             f"{data['reply_has_answer']})"]
    for s in data["steps"]:
        if s["summary"]:
            lines.append(f"  summary after the flush at step {s['step']}: {json.dumps(s['summary'])[:160]}")
    return "\n".join(lines)
