"""Main context: the context window as an agent's physical memory (MemGPT).

The prompt the LLM sees is assembled from read-only system instructions, the
core memory blocks, a recursive summary of evicted history and a FIFO queue of
recent messages. Tokens are counted with the model's own tokenizer and chat
template (a `count_tokens(messages)` function), against a budget of the
context window less the tokens kept free for the reply.

Memory pressure works like an OS under low memory: past `warning_fraction` of
the budget one system alert tells the agent to save what matters; past
`flush_fraction` the oldest part of the queue (`evict_fraction` of it, never
cutting a function call from its result) is evicted to recall storage and
folded into the summary by an LLM call. Guarantees: every message is in
recall storage from the moment it is appended; a prompt returned by `prompt`
never takes more tokens than the budget, so prompt plus reply fit the window.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from llmos.memory.archival import ArchivalStorage
from llmos.memory.core import CoreMemory
from llmos.memory.recall import Message, RecallStorage
from llmos.memory.store import MemoryStore

CountTokens = Callable[[list[dict[str, Any]]], int]
# (chat messages, max_tokens) -> the model's text: an LLM call the summary is written by.
Summarize = Callable[[list[dict[str, Any]], int], Awaitable[str]]

DEFAULT_SYSTEM = (
    "You are a persistent agent with memory that lasts beyond this conversation. Your context window "
    "is limited: old messages are evicted to recall storage and summarized. Core memory (below) is "
    "always visible; edit it with core_memory_append and core_memory_replace. Search past messages "
    "with conversation_search and conversation_search_date; store and search long-term facts with "
    "archival_memory_insert and archival_memory_search. The user only sees what you pass to "
    "send_message. Every reply is one function call; set request_heartbeat to true to run another "
    "step after the function returns."
)

_SUMMARY_SYSTEM = (
    "You maintain the running summary of a conversation between a user and an AI agent whose "
    "context window is full. Merge the earlier summary with the messages that are leaving the "
    "context into one new summary of at most {words} words. Keep facts about the user, decisions, "
    "and open tasks. Reply with the summary only."
)

TRUNCATED = "... [truncated; the full text is in recall storage]"
RECALL_FUNCTIONS = ("conversation_search", "conversation_search_date")
# A recall hit: a search whose function return showed messages (the memory tools' "Showing messages ...").
_HIT = '%"message": "Showing messages%'


class ContextError(ValueError):
    """A main-context configuration that cannot work (the message says which setting)."""


def event(kind: str, **fields: Any) -> str:
    """The text of a system event or function return, as the agent reads it (MemGPT's JSON packets)."""
    return json.dumps({"type": kind, **fields, "time": time.strftime("%Y-%m-%d %H:%M:%S")},
                      ensure_ascii=False)


def to_chat(message: Message) -> dict[str, str]:
    """A stored message as a chat message any backend accepts (events and returns come as user turns)."""
    role = message.role if message.role in ("user", "assistant") else "user"
    return {"role": role, "content": message.content}


@dataclass
class ContextConfig:
    context_window: int
    reply_tokens: int = 256  # kept free for the model's reply
    warning_fraction: float = 0.7
    flush_fraction: float = 1.0
    evict_fraction: float = 0.5
    summary_tokens: int = 200  # longest summary the summarizer may write

    def __post_init__(self) -> None:
        checks = [
            (self.context_window > 0, f"context_window must be positive, got {self.context_window}"),
            (0 < self.reply_tokens < self.context_window,
             f"reply_tokens must be in (0, context_window), got {self.reply_tokens}"),
            (0 < self.warning_fraction <= self.flush_fraction,
             f"warning_fraction must be in (0, flush_fraction], got {self.warning_fraction}"),
            (0 < self.flush_fraction <= 1, f"flush_fraction must be in (0, 1], got {self.flush_fraction}"),
            (0 < self.evict_fraction <= 1, f"evict_fraction must be in (0, 1], got {self.evict_fraction}"),
            (self.summary_tokens > 0, f"summary_tokens must be positive, got {self.summary_tokens}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ContextError(message)

    @property
    def budget(self) -> int:
        """Tokens a prompt may take."""
        return self.context_window - self.reply_tokens


@dataclass(frozen=True)
class Pressure:
    tokens: int
    budget: int

    @property
    def fraction(self) -> float:
        return self.tokens / self.budget


class MainContext:
    """One agent's main context, backed by its rows in the memory store."""

    def __init__(self, store: MemoryStore, agent: str, count_tokens: CountTokens, config: ContextConfig,
                 *, system: str = DEFAULT_SYSTEM, blocks: dict[str, tuple[str, int]] | None = None) -> None:
        self.store = store
        self.agent = agent
        self.count_tokens = count_tokens
        self.config = config
        self.recall = RecallStorage(store, agent)
        self.core = CoreMemory(store, agent)
        self.created = store.ensure_agent(agent, system, time.time())
        for label, (value, limit) in (blocks or {}).items():
            self.core.define(label, value, limit)
        if self.created:
            with store.transaction() as db:
                db.execute("UPDATE agents SET memory_stats = ? WHERE name = ?", (self._memory_stats(), agent))
        fixed = self.count_tokens([self.system_message()])
        if fixed + config.summary_tokens > config.budget:
            raise ContextError(
                f"a context window of {config.context_window} tokens cannot hold the system prompt and core "
                f"memory ({fixed} tokens), a {config.summary_tokens}-token summary and a "
                f"{config.reply_tokens}-token reply: give a larger window or smaller core memory")

    # -- state ------------------------------------------------------------------------------------

    def _row(self):
        return self.store.agent(self.agent)

    @property
    def summary(self) -> str:
        return self._row()["summary"]

    def stats(self) -> dict[str, Any]:
        row = self._row()
        return {"messages": self.recall.count(), "in_context": len(self.queue()),
                "evictions": row["evictions"], "summaries": row["summaries"], "warned": bool(row["warned"]),
                "llm_calls": row["llm_calls"], "largest_prompt": row["largest_prompt"],
                "overflows": row["overflows"], "tokens": self.pressure().tokens, "budget": self.config.budget}

    def recall_searches(self) -> tuple[int, int]:
        """(searches of recall storage, hits): the agent's conversation searches so far, and those that
        paged evicted or earlier messages back into its context (read from their stored returns)."""
        marks = ", ".join("?" * len(RECALL_FUNCTIONS))
        row = self.store.query(
            f"SELECT count(*), coalesce(sum(content LIKE ?), 0) FROM messages WHERE agent = ? "
            f"AND role = 'tool' AND name IN ({marks})", (_HIT, self.agent, *RECALL_FUNCTIONS))[0]
        return row[0], row[1]

    def view(self, count_tokens: CountTokens | None = None) -> dict[str, Any]:
        """A read-only picture of this main context (what a dashboard draws): the tokens its prompt
        takes now (split into instructions with core memory, summary and queue) against the budget
        and window, the warning and flush points, core memory, the queue's length, the summary, the
        sizes of recall and archival storage and the counters of memory pressure. Writes nothing;
        `count_tokens` defaults to the agent's own."""
        count = count_tokens or self.count_tokens
        row = self._row()
        queue = [to_chat(m) for m in self.queue()]
        fixed = count([self.system_message(summary="")])
        with_summary = count([self.system_message()]) if row["summary"] else fixed
        tokens = count([self.system_message(), *queue]) if queue else with_summary
        searches, hits = self.recall_searches()
        c = self.config
        return {"tokens": tokens, "fixed_tokens": fixed, "summary_tokens": with_summary - fixed,
                "queue_tokens": tokens - with_summary, "budget": c.budget, "window": c.context_window,
                "reply_tokens": c.reply_tokens, "warning_at": int(c.budget * c.warning_fraction),
                "flush_at": int(c.budget * c.flush_fraction),
                "core": [{"label": b.label, "value": b.value, "limit": b.limit} for b in self.core.blocks()],
                "queue": len(queue), "messages": self.recall.count(),
                "passages": ArchivalStorage(self.store, self.agent).count(), "summary": row["summary"],
                "summaries": row["summaries"], "evictions": row["evictions"], "warned": bool(row["warned"]),
                "recall_searches": searches, "recall_hits": hits, "llm_calls": row["llm_calls"],
                "overflows": row["overflows"]}

    def note_prompt(self, prompt_tokens: int, max_tokens: int) -> None:
        """Record a prompt the backend was sent (its own token count): the largest, and any that with
        its reply could overflow the window."""
        over = int(prompt_tokens + max_tokens > self.config.context_window)
        with self.store.transaction() as db:
            db.execute("UPDATE agents SET llm_calls = llm_calls + 1, overflows = overflows + ?, "
                       "largest_prompt = max(largest_prompt, ?) WHERE name = ?",
                       (over, prompt_tokens, self.agent))

    def queue(self) -> list[Message]:
        return self.recall.in_context()

    def append(self, role: str, content: str, *, name: str | None = None, search_text: str | None = None,
               created_at: float | None = None) -> Message:
        """Add a message to the end of the queue (and so to recall storage)."""
        return self.recall.append(role, content, name=name, search_text=search_text, created_at=created_at)

    def alert(self, message: str) -> Message:
        """A system event in the queue (memory pressure, heartbeats, errors)."""
        return self.append("system", event("system_alert", message=message))

    # -- assembly ---------------------------------------------------------------------------------

    def system_message(self, summary: str | None = None) -> dict[str, str]:
        row = self._row()
        summary = row["summary"] if summary is None else summary
        parts = [row["system"], "", "### Core memory", self.core.render() or "(empty)", "",
                 f"### Memory statistics\n{row['memory_stats'] or self._memory_stats()}"]
        if summary:
            parts += ["", "### Summary of evicted conversation", summary]
        return {"role": "system", "content": "\n".join(parts)}

    def _memory_stats(self) -> str:
        """Counts as of now; the prompt shows those of the last eviction, so that between evictions the
        prompt only grows at its end and the backend's prefix cache serves all of it but the new turn."""
        archival = ArchivalStorage(self.store, self.agent).count()
        return (f"{self.recall.count()} messages in recall storage, {archival} passages in archival "
                f"storage (as of the last eviction).")

    def messages(self) -> list[dict[str, str]]:
        """The assembled prompt (without the safety net of `prompt`)."""
        return [self.system_message(), *(to_chat(m) for m in self.queue())]

    def pressure(self) -> Pressure:
        return Pressure(self.count_tokens(self.messages()), self.config.budget)

    async def prompt(self, summarize: Summarize) -> tuple[list[dict[str, str]], int]:
        """Relieve memory pressure, then assemble the prompt; returns it and its token count (<= budget)."""
        await self.maintain(summarize)
        msgs = self.messages()
        tokens = self.count_tokens(msgs)
        if tokens > self.config.budget:  # only a single huge message (or summary) can still be over
            msgs, tokens = _fit(msgs, self.config.budget, self.count_tokens)
        return msgs, tokens

    # -- pressure ---------------------------------------------------------------------------------

    async def maintain(self, summarize: Summarize) -> list[str]:
        """Warn, then flush, as the queue fills; returns what it did ("warning", "flush")."""
        done: list[str] = []
        p = self.pressure()
        if p.fraction > self.config.warning_fraction and p.fraction <= self.config.flush_fraction \
                and not self._row()["warned"]:
            with self.store.transaction() as db:
                self.alert(f"Memory pressure: your context window is {p.fraction:.0%} full. Older messages "
                           "will soon be evicted to recall storage and summarized: save anything important "
                           "to core memory or archival memory now.")
                db.execute("UPDATE agents SET warned = 1 WHERE name = ?", (self.agent,))
            done.append("warning")
            p = self.pressure()
        while p.fraction > self.config.flush_fraction and len(self.queue()) > 1:
            await self.flush(summarize)
            done.append("flush")
            p = self.pressure()
        return done

    def eviction_cut(self, queue: list[Message]) -> int:
        """How many of the oldest messages to evict: about `evict_fraction` of the queue, at least one,
        leaving the newest message when it can, and never separating a function call from its result."""
        n = len(queue)
        k = min(max(1, round(n * self.config.evict_fraction)), n)
        while k < n and queue[k].role == "tool":
            k += 1
        if k == n and n > 1:  # keep the newest message (with its call, if it is a function result)
            k = n - 1
            while k > 0 and queue[k].role == "tool":
                k -= 1
            if k == 0:
                k = n
        return k

    async def flush(self, summarize: Summarize) -> int:
        """Evict the oldest messages and fold them into the recursive summary; returns how many."""
        queue = self.queue()
        if not queue:
            return 0
        evicted = queue[:self.eviction_cut(queue)]
        summary = await self._fold(self.summary, evicted, summarize)
        with self.store.transaction() as db:
            self.recall.evict([m.id for m in evicted])
            db.execute("UPDATE agents SET summary = ?, summaries = summaries + 1, memory_stats = ?, "
                       "evictions = evictions + ?, warned = 0 WHERE name = ?",
                       (summary, self._memory_stats(), len(evicted), self.agent))
        return len(evicted)

    def summary_request(self, summary: str, messages: list[Message]) -> list[dict[str, str]]:
        """The summarizer's prompt: the earlier summary and the messages leaving the context."""
        words = max(20, int(self.config.summary_tokens * 0.6))
        lines = [f"{m.role}: {m.content}" for m in messages]
        body = (f"Earlier summary:\n{summary or '(none)'}\n\nMessages leaving the context:\n"
                + "\n".join(lines))
        return [{"role": "system", "content": _SUMMARY_SYSTEM.format(words=words)},
                {"role": "user", "content": body}]

    async def _fold(self, summary: str, messages: list[Message], summarize: Summarize) -> str:
        """The new summary: the old one merged with `messages`, in as many summarizer calls as it takes
        to keep each call's prompt and reply inside the window (the summary is recursive by design)."""
        limit = self.config.context_window - self.config.summary_tokens
        rest = list(messages)
        while rest:
            take = len(rest)
            while take > 1 and self.count_tokens(self.summary_request(summary, rest[:take])) > limit:
                take = max(1, take // 2)
            chunk = rest[:take]
            request = self.summary_request(summary, chunk)
            if self.count_tokens(request) > limit:  # one message too long to summarize whole: cut it
                request, _ = _fit(request, limit, self.count_tokens)
            text = (await summarize(request, self.config.summary_tokens)).strip()
            summary = text or summary
            rest = rest[take:]
        return summary


def _fit(msgs: list[dict[str, str]], limit: int, count: CountTokens) -> tuple[list[dict[str, str]], int]:
    """Cut the longest message's text (it stays whole in recall storage) until `msgs` take at most
    `limit` tokens."""
    msgs = [dict(m) for m in msgs]
    tokens = count(msgs)
    while tokens > limit:
        i = max(range(len(msgs)), key=lambda j: len(msgs[j]["content"]))
        text = msgs[i]["content"]
        if len(text) <= len(TRUNCATED):
            raise ContextError(f"the prompt cannot be made to fit {limit} tokens")
        keep = max(0, len(text) - max(4 * (tokens - limit), len(text) // 4) - len(TRUNCATED))
        msgs[i]["content"] = text[:keep] + TRUNCATED
        tokens = count(msgs)
    return msgs, tokens
