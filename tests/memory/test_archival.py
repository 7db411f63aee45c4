"""Archival storage on the real all-MiniLM-L6-v2: ranking on a fixed corpus, paging, delete, IVF."""

import re
from pydoc_data.topics import topics

import numpy as np
import pytest

from llmos.memory import ArchivalError, ArchivalStorage, IVFIndex, MemoryStore
from llmos.memory.archival import default_nprobe, top_k

PASSAGES = [
    "Ana's dog Rex is a three-year-old border collie.",
    "The office wifi password is blue-falcon-42.",
    "Ana is allergic to peanuts and shellfish.",
    "The quarterly report is due on the last Friday of March.",
    "Ana's sister Marta works as a nurse in Lisbon.",
    "The spaceship engine uses liquid hydrogen as fuel.",
]


@pytest.fixture
def archival(store, embedder) -> ArchivalStorage:
    a = ArchivalStorage(store, "ana", embedder)
    a.insert_many(PASSAGES)
    return a


def test_embeddings_are_unit_vectors_and_batch_independent(embedder):
    one = embedder.encode([PASSAGES[0]])
    many = embedder.encode(PASSAGES)
    assert many.shape == (6, 384) and many.dtype == np.float32
    assert np.allclose(np.linalg.norm(many, axis=1), 1, atol=1e-5)
    assert np.allclose(one[0], many[0], atol=1e-5)
    # Meaning, not words: a paraphrase is nearer than an unrelated sentence.
    q = embedder.encode(["What pet does Ana have?"])[0]
    assert q @ many[0] > 0.4 > q @ many[5]


def test_search_ranks_by_meaning(archival):
    top = [p.text for p in archival.search("What food can't Ana eat?").items]
    assert top[0] == PASSAGES[2]
    assert [p.text for p in archival.search("how do I get on the wireless network").items][0] == PASSAGES[1]
    assert [p.text for p in archival.search("What kind of dog does Ana own?").items][0] == PASSAGES[0]
    assert [p.text for p in archival.search("Where does Ana's sister work?").items][0] == PASSAGES[4]
    page = archival.search("rocket propulsion", page_size=2)
    assert page.items[0].text == PASSAGES[5] and page.total == 6 and page.pages == 3
    scores = [p.score for p in archival.search("rocket propulsion", page_size=6).items]
    assert scores == sorted(scores, reverse=True)


def test_paging_and_delete(archival):
    pages = [archival.search("Ana", page=i, page_size=2).items for i in range(3)]
    assert sorted(p.text for page in pages for p in page) == sorted(PASSAGES)
    assert archival.search("Ana", page=3, page_size=2).items == []
    pid = archival.search("wifi password").items[0].id
    archival.delete(pid)
    assert archival.count() == 5
    assert PASSAGES[1] not in [p.text for p in archival.search("wifi password", page_size=5).items]
    with pytest.raises(ArchivalError, match=f"no archival passage with id {pid}"):
        archival.delete(pid)


def test_bad_input(archival):
    with pytest.raises(ArchivalError, match="a passage must be non-empty text"):
        archival.insert("   ")
    with pytest.raises(ArchivalError, match="query must be non-empty text"):
        archival.search("")
    with pytest.raises(ArchivalError, match="page must be a whole number >= 0, got -1"):
        archival.search("dog", page=-1)


def test_survives_restart_and_sees_other_writers(tmp_path, embedder):
    path = tmp_path / "memory.db"
    s1 = MemoryStore(path)
    a1 = ArchivalStorage(s1, "ana", embedder)
    a1.insert_many(PASSAGES[:3])
    assert a1.search("peanut allergy").items[0].text == PASSAGES[2]
    s2 = MemoryStore(path)  # a second connection (another process after a restart)
    ArchivalStorage(s2, "ana", embedder).insert("Ana's favourite colour is green.")
    assert a1.search("favourite colour").items[0].text == "Ana's favourite colour is green."
    s1.close()
    s2.close()
    s3 = MemoryStore(path)
    assert ArchivalStorage(s3, "ana", embedder).count() == 4
    s3.close()


def test_top_k_orders_ties_by_position():
    assert top_k(np.array([0.1, 0.9, 0.5, 0.9]), 3).tolist() == [1, 3, 2]
    assert top_k(np.array([0.3, 0.2]), 5).tolist() == [0, 1]


def _varied_sentences() -> list[str]:
    """Varied real English text, the same for a given Python: sentences of the stdlib's docstrings
    (read with ast, nothing imported) and of the Python reference manual's topics."""
    import ast
    import sysconfig
    from pathlib import Path

    texts = list(topics.values())
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(f.read_text(errors="ignore"))
        except (SyntaxError, ValueError):
            continue
        documented = (ast.Module, ast.ClassDef, ast.FunctionDef)
        texts += [d for node in ast.walk(tree)
                  if isinstance(node, documented) and (d := ast.get_docstring(node))]
    return sorted({s for t in texts for s in re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", t))
                   if 40 <= len(s) <= 200 and s[0].isupper() and ">>>" not in s})


def test_ivf_default_finds_what_exact_search_finds_on_varied_real_text(store, embedder):
    sentences = _varied_sentences()
    pick = np.random.default_rng(0).permutation(len(sentences))[:1100]
    vecs = embedder.encode([sentences[i] for i in pick])
    stored, queries = vecs[:1000], vecs[1000:]  # the questions are not among the stored passages
    index = IVFIndex(stored)
    assert index.nlist == int(2 * np.sqrt(1000)) == 63
    assert index.nprobe == default_nprobe(63) == 24  # 3 * sqrt(nlist)
    assert sorted(index.rows.tolist()) == list(range(1000))  # every vector sits in exactly one cell
    a = ArchivalStorage(store, "big", embedder, ivf_threshold=1000)
    a.insert_many([sentences[i] for i in pick[:1000]], vectors=stored)
    assert a._vectors().index.nprobe == 24  # archival storage searches at the default

    def recall(nprobe: int) -> tuple[float, float]:
        a._vectors().index.nprobe = nprobe
        hits = scanned = 0
        for q in queries:
            exact_ids, exact_scores = a.nearest(q, 5, exact=True)
            _, scores = a.nearest(q, 5)
            hits += int(np.sum(scores >= exact_scores[-1] - 1e-6))  # as near as the exact 5th
            scanned += len(a._vectors().index.candidates(q))
        return hits / (5 * len(queries)), scanned / (1000 * len(queries))

    default, fixed16, fixed4 = recall(24), recall(16), recall(4)
    # measured: 0.97 scanning 42% of the vectors; a fixed 16 cells (the old default) 0.93, 4 cells 0.73
    assert default[0] >= 0.95 and default[1] < 0.5
    assert fixed4[0] < fixed16[0] < default[0] and fixed4[0] < 0.85
