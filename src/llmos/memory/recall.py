"""Recall storage: the swap space of the conversation. Every message an agent
sees or writes is stored here the moment it enters main context, and stays
after it is evicted, so nothing an agent was told is ever lost.

Searchable by text (SQLite FTS5 with Porter stemming, ranked by BM25) and by
date range; results come in pages. Guarantees: messages keep the order they
were appended in (their id), and a message is in exactly one of two states,
in main context's FIFO queue or evicted.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Generic, TypeVar

from llmos.memory.store import MemoryStore

ROLES = ("system", "user", "assistant", "tool")
DEFAULT_PAGE_SIZE = 5

_STOPWORDS = frozenset("""
a an and are as at be been but by can could did do does for from had has have he her hers him his how i
if in into is it its me my mine no not of on or our ours she so than that the their them then there these
they this those to us was we were what when where which who whom why will with would you your yours
tell remember recall know about again please did does say said
""".split())

T = TypeVar("T")


class RecallError(ValueError):
    """A bad recall query (the message names the argument that was wrong)."""


@dataclass(frozen=True)
class Message:
    id: int
    role: str
    content: str
    created_at: float
    name: str | None = None
    in_context: bool = True

    def as_dict(self) -> dict:
        """The message as a search result the agent reads."""
        when = datetime.fromtimestamp(self.created_at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        return {"id": self.id, "role": self.role, "time": when, "content": self.content}


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of results: `items` for page number `page` (0-based) of `total` results."""

    items: list[T]
    page: int
    page_size: int
    total: int

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.page_size))


def _message(row) -> Message:
    return Message(row["id"], row["role"], row["content"], row["created_at"], row["name"],
                   bool(row["in_context"]))


def fts_query(query: str) -> str:
    """A natural-language question as an FTS5 query: its content words, any of them, quoted."""
    words = re.findall(r"\w+", query.lower())
    content = [w for w in words if w not in _STOPWORDS and len(w) > 1]
    chosen = list(dict.fromkeys(content or words))
    if not chosen:
        raise RecallError(f"query {query!r} has no words to search for")
    return " OR ".join(f'"{w}"' for w in chosen)


def parse_date(value: str, field: str) -> float:
    """A YYYY-MM-DD date (UTC midnight) as a timestamp."""
    try:
        day = datetime.strptime(value.strip(), "%Y-%m-%d")
    except (ValueError, AttributeError):
        raise RecallError(f"{field} must be a date as YYYY-MM-DD, got {value!r}") from None
    return day.replace(tzinfo=UTC).timestamp()


def _check_page(page: int, page_size: int) -> None:
    if not isinstance(page, int) or isinstance(page, bool) or page < 0:
        raise RecallError(f"page must be a whole number >= 0, got {page!r}")
    if page_size < 1:
        raise RecallError(f"page_size must be at least 1, got {page_size}")


class RecallStorage:
    """The messages of one agent."""

    def __init__(self, store: MemoryStore, agent: str) -> None:
        self.store = store
        self.agent = agent

    def append(self, role: str, content: str, *, name: str | None = None, search_text: str | None = None,
               created_at: float | None = None, in_context: bool = True) -> Message:
        """Store a message; `search_text` is what text search sees (default: user and assistant content)."""
        if role not in ROLES:
            raise RecallError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        if search_text is None:
            search_text = content if role in ("user", "assistant") else ""
        when = time.time() if created_at is None else created_at
        with self.store.transaction() as db:
            cur = db.execute("INSERT INTO messages(agent, role, name, content, search_text, created_at, "
                             "in_context) VALUES (?,?,?,?,?,?,?)",
                             (self.agent, role, name, content, search_text, when, int(in_context)))
            return Message(cur.lastrowid, role, content, when, name, in_context)

    def extend(self, rows: list[tuple[str, str, float]], in_context: bool = False) -> None:
        """Bulk-load (role, content, created_at) rows in one transaction (imports, benchmarks)."""
        with self.store.transaction() as db:
            db.executemany("INSERT INTO messages(agent, role, content, search_text, created_at, in_context) "
                           "VALUES (?,?,?,?,?,?)",
                           [(self.agent, r, c, c if r in ("user", "assistant") else "", t, int(in_context))
                            for r, c, t in rows])

    def count(self) -> int:
        return self.store.query("SELECT count(*) FROM messages WHERE agent = ?", (self.agent,))[0][0]

    def get(self, message_id: int) -> Message:
        rows = self.store.query("SELECT * FROM messages WHERE agent = ? AND id = ?", (self.agent, message_id))
        if not rows:
            raise RecallError(f"no message {message_id} in recall storage")
        return _message(rows[0])

    def in_context(self) -> list[Message]:
        """Main context's FIFO queue, oldest first."""
        rows = self.store.query("SELECT * FROM messages WHERE agent = ? AND in_context = 1 ORDER BY id",
                                (self.agent,))
        return [_message(r) for r in rows]

    def evict(self, ids: list[int]) -> None:
        """Take messages out of the queue (they stay in recall storage)."""
        with self.store.transaction() as db:
            db.executemany("UPDATE messages SET in_context = 0 WHERE agent = ? AND id = ?",
                           [(self.agent, i) for i in ids])

    def search(self, query: str, page: int = 0, page_size: int = DEFAULT_PAGE_SIZE) -> Page[Message]:
        """Messages matching any content word of `query`, best BM25 rank first."""
        _check_page(page, page_size)
        match = fts_query(query)
        # CROSS JOIN: the full-text index drives the loop (SQLite would rather scan the agent's rows).
        base = ("FROM messages_fts CROSS JOIN messages m ON m.id = messages_fts.rowid "
                "WHERE messages_fts MATCH ? AND m.agent = ?")
        total = self.store.query(f"SELECT count(*) {base}", (match, self.agent))[0][0]
        rows = self.store.query(f"SELECT m.* {base} ORDER BY bm25(messages_fts), m.id LIMIT ? OFFSET ?",
                                (match, self.agent, page_size, page * page_size))
        return Page([_message(r) for r in rows], page, page_size, total)

    def search_date(self, start_date: str, end_date: str, page: int = 0,
                    page_size: int = DEFAULT_PAGE_SIZE) -> Page[Message]:
        """Messages from `start_date` to `end_date` (YYYY-MM-DD, UTC, both days included), oldest first."""
        _check_page(page, page_size)
        start = parse_date(start_date, "start_date")
        end = (parse_date(end_date, "end_date") + timedelta(days=1).total_seconds())
        if end <= start:
            raise RecallError(f"end_date {end_date} is before start_date {start_date}")
        where = "WHERE agent = ? AND created_at >= ? AND created_at < ? AND role IN ('user', 'assistant')"
        total = self.store.query(f"SELECT count(*) FROM messages {where}", (self.agent, start, end))[0][0]
        rows = self.store.query(f"SELECT * FROM messages {where} ORDER BY created_at, id LIMIT ? OFFSET ?",
                                (self.agent, start, end, page_size, page * page_size))
        return Page([_message(r) for r in rows], page, page_size, total)
