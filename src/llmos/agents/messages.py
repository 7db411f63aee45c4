"""The messages of an agent turn, typed like Letta's (what the agents API returns and streams).

A turn's record is the agent's message queue in recall storage: the user's
message, each function call (an assistant row holding {"function",
"arguments"}), each function return (a tool row holding MemGPT's
function_return packet) and system alerts. This module maps those rows onto
Letta's message types: a successful `send_message` call is an
`AssistantMessage` (its return is not shown, as in Letta's assistant-message
mode); any other call is a `ToolCallMessage` followed by its
`ToolReturnMessage`. Every message carries the id of the recall row it comes
from, so a turn's messages and a later history listing agree.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from llmos.agents.tool_rules import REPLY_TOOL
from llmos.memory import Message


def _iso(when: float) -> str:
    return datetime.fromtimestamp(when, UTC).isoformat()


@dataclass(frozen=True)
class UserMessage:
    id: int
    date: float
    content: str
    message_type = "user_message"

    def to_letta(self) -> dict[str, Any]:
        return {"message_type": self.message_type, "id": f"message-{self.id}", "date": _iso(self.date),
                "content": self.content}


@dataclass(frozen=True)
class AssistantMessage:
    id: int
    date: float
    content: str
    message_type = "assistant_message"

    def to_letta(self) -> dict[str, Any]:
        return {"message_type": self.message_type, "id": f"message-{self.id}", "date": _iso(self.date),
                "content": self.content}


@dataclass(frozen=True)
class ToolCallMessage:
    id: int
    date: float
    name: str
    arguments: dict[str, Any]
    message_type = "tool_call_message"

    @property
    def tool_call_id(self) -> str:
        return f"call-{self.id}"

    def to_letta(self) -> dict[str, Any]:
        call = {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False),
                "tool_call_id": self.tool_call_id}
        return {"message_type": self.message_type, "id": f"message-{self.id}", "date": _iso(self.date),
                "tool_call": call}


@dataclass(frozen=True)
class ToolReturnMessage:
    id: int
    date: float
    name: str
    tool_call_id: str
    status: str  # "success" | "error"
    tool_return: str
    message_type = "tool_return_message"

    def to_letta(self) -> dict[str, Any]:
        return {"message_type": self.message_type, "id": f"message-{self.id}", "date": _iso(self.date),
                "name": self.name, "tool_call_id": self.tool_call_id, "status": self.status,
                "tool_return": self.tool_return}


AgentMessage = UserMessage | AssistantMessage | ToolCallMessage | ToolReturnMessage


def call_messages(call: Message, result: Message) -> list[AgentMessage]:
    """The Letta messages of one function call row and its return row."""
    body = json.loads(call.content)
    ret = json.loads(result.content)
    name, args = body["function"], body["arguments"]
    if name == REPLY_TOOL and ret.get("status") == "OK" and isinstance(args.get("message"), str):
        return [AssistantMessage(call.id, call.created_at, args["message"])]
    status = "success" if ret.get("status") == "OK" else "error"
    return [ToolCallMessage(call.id, call.created_at, name, args),
            ToolReturnMessage(result.id, result.created_at, name, f"call-{call.id}", status,
                              str(ret.get("message", "")))]


def from_recall(rows: Iterable[Message]) -> list[AgentMessage]:
    """Letta messages of stored rows in order (a history listing): user messages, and each function
    call with its return; system alerts and replies that were not a valid call are left out."""
    out: list[AgentMessage] = []
    pending: Message | None = None
    for row in rows:
        if row.role == "user":
            out.append(UserMessage(row.id, row.created_at, row.content))
        elif row.role == "assistant" and row.name:
            pending = row
        elif row.role == "tool" and pending is not None and row.name == pending.name:
            out += call_messages(pending, row)
            pending = None
    return out
