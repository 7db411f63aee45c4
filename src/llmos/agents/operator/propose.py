"""LLM proposals: the model diagnoses a finding and answers with one typed action.

The answer is decoded under a JSON schema (constrained decoding), narrowed to
the kinds and targets that fit the finding, so it is always one action of the
vocabulary; whether it may run is still the guardrails' call. `chat` is any
coroutine `(messages, json_schema) -> text`: a kernel syscall when the
operator runs as an agent (`syscalls_chat`), or an embedded engine when it
runs standalone (`engine_chat`).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from typing import Any

from llmos.agents.operator.actions import ActionError, NoAction, action_schema, parse_action
from llmos.agents.operator.detect import Finding
from llmos.agents.operator.observe import Observation
from llmos.agents.operator.policy import Attempt

Chat = Callable[[list[dict[str, Any]], dict[str, Any]], Awaitable[str]]

_SYSTEM = ("You are the operator of a computer. You read a finding about the system and its evidence, "
           "and you answer with exactly one action as JSON. Prefer the action that removes the cause: "
           "kill a process that burns CPU or memory, remove the largest files of a full scratch "
           "directory, suspend an agent over its quota, give the engine more KV blocks when it thrashes. "
           "Answer none when nothing is wrong.")


def _kinds(finding: Finding, obs: Observation) -> dict[str, Any]:
    """The kinds and targets that fit this finding's subject."""
    kind, _, key = finding.subject.partition(":")
    if kind == "pid" and key.isdigit():
        return {"kinds": ("kill_process", "renice_process", "none"), "pids": [int(key)]}
    if kind == "path" and key in obs.scratch:
        paths = [os.path.join(key, name) for name, _ in obs.scratch[key].largest]
        return {"kinds": ("remove_files", "none"), "paths": paths}
    if kind == "agent" and key.isdigit():
        return {"kinds": ("suspend_agent", "kill_agent", "none"), "agents": [int(key)]}
    if finding.signal.startswith("llmos."):
        return {"kinds": ("set_setting", "none")}
    return {"kinds": ("none",)}


class LLMProposer:
    name = "llm"

    def __init__(self, chat: Chat, settings: Callable[[], dict[str, Any]] | None = None) -> None:
        self.chat = chat
        self.settings = settings
        self.invalid = 0  # answers that did not parse (a truncated answer, say)

    def prompt(self, finding: Finding, obs: Observation, attempts: list[Attempt]) -> list[dict[str, Any]]:
        facts: dict[str, Any] = {"finding": finding.as_dict(), "evidence": obs.evidence(finding.subject)}
        if self.settings is not None and finding.signal.startswith("llmos."):
            facts["settings"] = self.settings()
        if attempts:
            facts["earlier_actions"] = [{"kind": a.kind, "recovered": a.recovered} for a in attempts]
        return [{"role": "system", "content": _SYSTEM},
                {"role": "user", "content": json.dumps(facts)}]

    async def propose(self, finding: Finding, obs: Observation, attempts: list[Attempt]) -> Any:
        schema = action_schema(**_kinds(finding, obs))
        text = await self.chat(self.prompt(finding, obs, attempts), schema)
        try:
            return parse_action(text)
        except ActionError as e:
            self.invalid += 1
            return NoAction(reason=f"model answer rejected: {e}"[:80])


def engine_chat(llm: Any, max_tokens: int = 96) -> Chat:
    """A Chat on an embedded `llmos.LLM`, greedy, under the schema's grammar (runs in a thread)."""
    from llmos.engine import SamplingParams

    async def chat(messages: list[dict[str, Any]], schema: dict[str, Any]) -> str:
        params = SamplingParams(max_tokens=max_tokens, temperature=0, json_schema=schema)
        out = await asyncio.to_thread(llm.chat, [messages], params)
        return out[0].outputs[0].text

    return chat


def syscalls_chat(sys: Any, max_tokens: int = 96) -> Chat:
    """A Chat through the kernel (`sys.llm_chat`): the operator's LLM calls are scheduled like any agent's."""

    async def chat(messages: list[dict[str, Any]], schema: dict[str, Any]) -> str:
        result = await sys.llm_chat(messages, max_tokens=max_tokens, temperature=0.0, json_schema=schema)
        return result.text

    return chat
