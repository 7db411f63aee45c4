"""Recall storage and core memory on a real SQLite file: ranking, dates, paging, limits, restarts."""

from datetime import UTC, datetime

import pytest

from llmos.memory import CoreMemory, CoreMemoryError, MemoryStore, RecallError, RecallStorage
from llmos.memory.recall import fts_query

CORPUS = [
    "My dog Rex loves chasing squirrels in the park",
    "I bought a new laptop for work yesterday",
    "The park near my house has a big lake",
    "Rex the dog is three years old",
    "My sister lives in Lisbon and works as a nurse",
    "Lisbon has great pastries",
]


def ts(day: str) -> float:
    return datetime.strptime(day, "%Y-%m-%d %H:%M").replace(tzinfo=UTC).timestamp()


@pytest.fixture
def recall(store) -> RecallStorage:
    r = RecallStorage(store, "ana")
    for i, text in enumerate(CORPUS):
        r.append("user" if i % 2 == 0 else "assistant", text, created_at=ts(f"2024-05-0{i + 1} 12:00"))
    return r


def test_query_keeps_content_words_only():
    assert fts_query("How old is my dog Rex?") == '"old" OR "dog" OR "rex"'
    assert fts_query("the the of") == '"the" OR "of"'  # only stopwords: keep them rather than fail
    with pytest.raises(RecallError, match="no words to search for"):
        fts_query("?!")


def test_search_ranks_by_bm25_with_stemming(recall):
    page = recall.search("How old is my dog Rex?")
    assert [m.content for m in page.items] == [CORPUS[3], CORPUS[0]]
    assert page.total == 2
    # Porter stemming: "chased squirrel" finds "chasing squirrels".
    assert [m.content for m in recall.search("chased a squirrel").items] == [CORPUS[0]]
    assert [m.content for m in recall.search("Where does my sister live?").items] == [CORPUS[4]]
    assert recall.search("quantum chromodynamics").total == 0


def test_search_is_per_agent_and_skips_events(store, recall):
    other = RecallStorage(store, "bob")
    other.append("user", "Rex is my cat, not a dog")
    recall.append("tool", '{"type": "function_return", "message": "dog Rex"}')
    assert all(m.content in CORPUS for m in recall.search("dog rex").items)
    assert [m.content for m in other.search("dog").items] == ["Rex is my cat, not a dog"]


def test_paging(recall):
    first = recall.search("park lake dog Lisbon laptop", page=0, page_size=2)
    second = recall.search("park lake dog Lisbon laptop", page=1, page_size=2)
    third = recall.search("park lake dog Lisbon laptop", page=2, page_size=2)
    assert first.total == 6 and first.pages == 3
    ids = [m.id for p in (first, second, third) for m in p.items]
    assert len(ids) == 6 and len(set(ids)) == 6
    assert recall.search("park", page=5).items == []
    with pytest.raises(RecallError, match="page must be a whole number >= 0"):
        recall.search("park", page=-1)


def test_search_by_date_includes_both_days(recall):
    page = recall.search_date("2024-05-02", "2024-05-04")
    assert [m.content for m in page.items] == CORPUS[1:4]
    assert recall.search_date("2024-06-01", "2024-06-30").total == 0
    with pytest.raises(RecallError, match="start_date must be a date as YYYY-MM-DD, got 'May 2'"):
        recall.search_date("May 2", "2024-05-04")
    with pytest.raises(RecallError, match="end_date 2024-05-01 is before start_date 2024-05-03"):
        recall.search_date("2024-05-03", "2024-05-01")


def test_queue_and_eviction_state(recall):
    assert [m.content for m in recall.in_context()] == CORPUS
    first_two = [m.id for m in recall.in_context()[:2]]
    recall.evict(first_two)
    assert [m.content for m in recall.in_context()] == CORPUS[2:]
    assert recall.count() == 6  # evicted messages stay in recall storage
    assert recall.get(first_two[0]).in_context is False
    with pytest.raises(RecallError, match="role must be one of"):
        recall.append("robot", "hi")


def test_core_memory_edits_and_limits(store):
    core = CoreMemory(store, "ana")
    core.define("persona", "I am Sam.", 40)
    core.define("human", "", 30)
    core.define("persona", "ignored: the block exists", 40)
    assert core.get("persona").value == "I am Sam."
    assert core.append("human", "Name: Ana") == "Name: Ana"
    assert core.append("human", "Likes tea") == "Name: Ana\nLikes tea"
    assert core.replace("human", "tea", "coffee") == "Name: Ana\nLikes coffee"
    assert core.replace("human", "\nLikes coffee", "") == "Name: Ana"
    with pytest.raises(CoreMemoryError, match="would hold 41 characters, over its limit of 30"):
        core.append("human", "x" * 31)
    assert core.get("human").value == "Name: Ana"  # a refused edit changes nothing
    with pytest.raises(CoreMemoryError, match="'cats' is not in core memory block 'human'"):
        core.replace("human", "cats", "dogs")
    with pytest.raises(CoreMemoryError, match=r"no core memory block 'pets' \(blocks: persona, human\)"):
        core.append("pets", "Rex")
    assert core.render() == ('<persona characters="9/40">\nI am Sam.\n</persona>\n'
                             '<human characters="9/30">\nName: Ana\n</human>')


def test_everything_survives_a_restart(tmp_path):
    path = tmp_path / "memory.db"
    s = MemoryStore(path)
    CoreMemory(s, "ana").define("human", "Name: Ana", 100)
    r = RecallStorage(s, "ana")
    ids = [r.append("user", t).id for t in CORPUS]
    r.evict(ids[:3])
    s.close()
    s2 = MemoryStore(path)
    r2 = RecallStorage(s2, "ana")
    assert CoreMemory(s2, "ana").get("human").value == "Name: Ana"
    assert [m.content for m in r2.in_context()] == CORPUS[3:]
    assert [m.content for m in r2.search("sister Lisbon").items][0] == CORPUS[4]
    s2.close()


def test_a_failed_transaction_leaves_nothing(store):
    r = RecallStorage(store, "ana")
    with pytest.raises(RuntimeError):
        with store.transaction():
            r.append("user", "half-written")
            raise RuntimeError("crash")
    assert r.count() == 0 and r.search("written").total == 0
