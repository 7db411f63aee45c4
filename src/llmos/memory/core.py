"""Core memory: the small, always-resident part of main context that the agent
itself edits (MemGPT's `persona` and `human` blocks).

Each block has a label and a character limit. Guarantee: a block never holds
more than its limit; an edit that would overflow it, or one naming a block or
text that is not there, changes nothing and raises `CoreMemoryError` with a
message the agent can act on.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmos.memory.store import MemoryStore

DEFAULT_BLOCK_LIMIT = 2000


class CoreMemoryError(ValueError):
    """A core memory edit that was refused; the message says why (the agent reads it)."""


@dataclass(frozen=True)
class Block:
    label: str
    value: str
    limit: int


class CoreMemory:
    """The core memory blocks of one agent, read from and written to the store."""

    def __init__(self, store: MemoryStore, agent: str) -> None:
        self.store = store
        self.agent = agent

    def blocks(self) -> list[Block]:
        rows = self.store.query("SELECT label, value, char_limit FROM core_blocks WHERE agent = ? "
                                "ORDER BY rowid", (self.agent,))
        return [Block(r["label"], r["value"], r["char_limit"]) for r in rows]

    def get(self, label: str) -> Block:
        for block in self.blocks():
            if block.label == label:
                return block
        known = ", ".join(b.label for b in self.blocks()) or "none"
        raise CoreMemoryError(f"no core memory block {label!r} (blocks: {known})")

    def define(self, label: str, value: str = "", limit: int = DEFAULT_BLOCK_LIMIT) -> None:
        """Create a block unless it exists (an existing block keeps its value)."""
        if limit < 1:
            raise CoreMemoryError(f"block {label!r}: limit must be at least 1, got {limit}")
        if len(value) > limit:
            raise CoreMemoryError(f"block {label!r}: initial value has {len(value)} characters, "
                                  f"over its limit of {limit}")
        with self.store.transaction() as db:
            db.execute("INSERT OR IGNORE INTO core_blocks(agent, label, value, char_limit) VALUES (?,?,?,?)",
                       (self.agent, label, value, limit))

    def _write(self, block: Block, value: str) -> str:
        if len(value) > block.limit:
            raise CoreMemoryError(
                f"core memory block {block.label!r} would hold {len(value)} characters, over its limit "
                f"of {block.limit} ({block.limit - len(block.value)} left): shorten the text, or move "
                f"details to archival memory")
        with self.store.transaction() as db:
            db.execute("UPDATE core_blocks SET value = ? WHERE agent = ? AND label = ?",
                       (value, self.agent, block.label))
        return value

    def append(self, label: str, content: str) -> str:
        """Add `content` as a new line at the end of the block; returns the new value."""
        block = self.get(label)
        if not content:
            raise CoreMemoryError("content to append is empty")
        return self._write(block, f"{block.value}\n{content}" if block.value else content)

    def replace(self, label: str, old_content: str, new_content: str) -> str:
        """Replace the exact text `old_content` (every occurrence); an empty `new_content` deletes it."""
        block = self.get(label)
        if not old_content:
            raise CoreMemoryError("old_content is empty: give the exact text to replace")
        if old_content not in block.value:
            raise CoreMemoryError(f"{old_content!r} is not in core memory block {label!r}")
        return self._write(block, block.value.replace(old_content, new_content))

    def render(self) -> str:
        """The blocks as the agent sees them in its system prompt."""
        parts = []
        for b in self.blocks():
            parts.append(f'<{b.label} characters="{len(b.value)}/{b.limit}">\n{b.value}\n</{b.label}>')
        return "\n".join(parts)
