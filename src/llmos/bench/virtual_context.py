"""`llmos bench memory`: virtual context management (MemGPT) measured.

Retrieval: a seeded multi-session conversation (200 sessions, about 100k
tokens) states 100 facts once, each about a different person; afterwards
each fact is asked about in other words. Every question goes to
`conversation_search` (recall storage, BM25) and `archival_memory_search`
(all-MiniLM-L6-v2 over every message archived), through the memory functions
themselves; recall@5 is the share of questions whose fact message is on the
first page (5 results). Latency: p50/p99 of both searches with 10k and 100k
stored messages (exact and IVF for archival).

Context: the MemGPT agent runs on the embedded model through the kernel for a
2,000-message conversation in a 2,048-token window; the report gives
evictions, summaries, the largest prompt the backend was sent (which must fit
the window with its reply) and whether every message is in recall storage.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from llmos.bench.engine import write_report

NAMES = """Aaron Abigail Adrian Alice Amara Andre Anika Arjun Astrid Beatriz Benedikt Bianca Boris Bruno
Camila Carmen Cedric Chiara Connor Dalia Damian Daria Dmitri Dolores Eamon Edith Elif Emeka Esther Fabian
Farah
Felix Fiona Gareth Gemma Gideon Greta Hamid Hanna Harvey Helga Hugo Ingrid Isaac Ivana Jasper Jelena Joaquin
Julia Kai Kamala Keiko Klaus Lars Leila Leonie Lorenzo Lucia Magnus Malik Marisol Matteo Mei Milan Mira
Nadia Nikolai Noor Odette Olaf Omar Orla Pablo Paloma Petra Priya Quentin Rafael Rania Rosa Rupert Sakura
Samir Selma Soren Stella Tariq Thea Tobias Ulla Valentin Vera Wendell Ximena Yara Yusuf Zelda Zoran
Ignatius Jonas Mateo Nils Ottilie Wilhelmina""".split()

# (statement, question): the question never repeats the statement's wording beyond the name.
FACTS = [
    ("{n} from my book club just adopted a {animal} and named it {pet}.",
     "What is the name of the pet {n} got?"),
    ("{n}, my old college roommate, now works as {job} in {city}.",
     "What does {n} do for a living these days?"),
    ("Remember that {n}'s wedding anniversary falls on {month} {day}.",
     "When do {n} and their spouse celebrate their marriage?"),
    ("{n} lent me {amount} dollars last week for the concert tickets.",
     "How much money do I owe {n}?"),
    ("{n} told me their favourite dessert is {dessert}.",
     "Which sweet treat does {n} like best?"),
    ("The door code for {n}'s apartment building is {code}.",
     "How do I get into the building where {n} lives?"),
    ("{n} is training to run the {city} marathon in {month}.",
     "Which race is {n} preparing for?"),
    ("{n} drives a battered old {color} {car}.",
     "What kind of vehicle does {n} own?"),
    ("{n} recommended I read the novel {book}.",
     "Which book did {n} suggest to me?"),
    ("{n} is severely allergic to {allergen}, so keep it off the menu.",
     "What food must {n} avoid?"),
]
SLOTS = {
    "animal": "dog cat parrot hamster tortoise rabbit ferret goldfish iguana hedgehog".split(),
    "pet": "Biscuit Pixel Mango Waffles Nimbus Pickle Socks Jupiter Clover Pretzel Ziggy Noodle".split(),
    "job": ["a marine biologist", "a tax accountant", "a pastry chef", "an airline pilot",
            "a museum curator", "a civil engineer", "a radio producer", "a veterinary nurse",
            "a patent lawyer", "a bike mechanic"],
    "city": ("Lisbon Oslo Nairobi Montreal Osaka Valparaiso Tbilisi Adelaide Krakow Reykjavik Porto "
             "Hanoi").split(),
    "month": ("January February March April May June July August September October November "
              "December").split(),
    "dessert": ["tiramisu", "lemon meringue pie", "baklava", "creme brulee", "carrot cake", "mochi",
                "apple strudel", "pavlova", "churros", "panna cotta"],
    "color": "red blue green yellow silver black white orange purple beige".split(),
    "car": ["Volvo estate", "Fiat Panda", "Ford pickup", "Mini Cooper", "Land Rover", "Toyota Corolla",
            "VW camper van", "Saab convertible", "Renault Clio", "Honda Civic"],
    "book": ["The Glass Orchard", "A Winter of Lanterns", "The Salt Cartographer", "Nine Quiet Rivers",
             "The Clockmaker's Daughter", "Beneath the Copper Sky", "The Last Lighthouse",
             "Paper Tigers of Kyoto", "The Orchid Ledger", "Songs for a Tin Moon"],
    "allergen": "peanuts shellfish sesame kiwi mustard celery lupin walnuts soy buckwheat".split(),
}

FILLER_USER = [
    "I spent most of the afternoon {activity}, which was nice.",
    "The weather today was {weather}, so I stayed {where} for a while.",
    "I had a long meeting about the {project} project and it ran over.",
    "Do you have any tips for {task}?",
    "I'm thinking about {plan} this weekend.",
    "{n} and I grabbed coffee and chatted about {topic}.",
    "I ran into {n} at the {place} this morning.",
    "My {device} has been acting up again lately.",
    "I finally finished {chore} after putting it off for days.",
    "Dinner tonight was {meal}, not bad at all.",
    "{n} sent me a funny video about {topic}.",
    "I keep forgetting to water the {plant} on my balcony.",
]
FILLER_ASSISTANT = [
    "That sounds {adj}! How did it make you feel?",
    "Good to hear. Is there anything you'd like to plan next?",
    "I can help with that: break it into small steps and start with the easiest one.",
    "Thanks for telling me. Want me to remind you about it later?",
    "Interesting! What was the best part of it?",
    "That's understandable. A short walk might help you reset.",
    "Noted. Let me know if anything changes.",
    "Sounds like a {adj} day overall.",
]
FILL = {
    "activity": ["reading in the park", "cleaning the garage", "painting the fence", "baking bread",
                 "sorting old photos", "fixing my bike", "practising guitar", "walking by the river"],
    "weather": ["rainy", "sunny", "windy", "foggy", "freezing", "humid", "grey", "stormy"],
    "where": ["inside", "at the cafe", "at the library", "at home", "in the office"],
    "project": ["billing", "onboarding", "migration", "website", "analytics", "mobile", "hiring"],
    "task": ["sleeping better", "cooking rice", "saving money", "learning Spanish", "staying focused",
             "packing light", "writing emails faster"],
    "plan": ["going hiking", "visiting my parents", "repainting the kitchen", "trying a new recipe",
             "a day trip to the coast", "doing nothing at all"],
    "topic": ["football", "the election", "a new TV series", "climate change", "cooking", "their holiday",
              "work gossip", "old school friends"],
    "place": ["bakery", "gym", "train station", "supermarket", "post office", "farmers market"],
    "device": ["laptop", "phone", "printer", "router", "dishwasher", "car radio"],
    "chore": ["my tax return", "the laundry", "the ironing", "sorting my inbox", "cleaning the oven"],
    "meal": ["pasta with pesto", "a vegetable curry", "leftover pizza", "grilled fish", "lentil soup"],
    "plant": ["basil", "tomatoes", "lavender", "cactus", "rosemary", "fern"],
    "adj": ["lovely", "exhausting", "productive", "relaxing", "eventful", "busy"],
}
DAY0 = 1704067200.0  # 2024-01-01 00:00 UTC


@dataclass
class Conversation:
    rows: list[tuple[str, str, float]]  # (role, content, created_at)
    facts: list[tuple[int, str]]  # (index of the fact's message in rows, question)


def _fill(template: str, rng: random.Random, **fixed: str) -> str:
    slots = {k: rng.choice(v) for k, v in {**FILL, **SLOTS}.items()}
    slots["n"] = rng.choice(NAMES)
    slots["day"] = str(rng.randint(1, 28))
    slots["amount"] = str(rng.randint(2, 60) * 5)
    slots["code"] = f"{rng.randint(1000, 9999)}"
    return template.format(**{**slots, **fixed})


def make_conversation(sessions: int = 200, facts: int = 100, messages_per_session: int = 28,
                      seed: int = 0) -> Conversation:
    """A seeded conversation of `sessions` daily sessions; `facts` facts (one per person) are stated
    once each, in user messages at random places, among filler that names the same people."""
    rng = random.Random(seed)
    if facts > len(NAMES):
        raise ValueError(f"at most {len(NAMES)} facts (one per person), got {facts}")
    people = rng.sample(NAMES, facts)
    facts_at = sorted(rng.sample(range(sessions * messages_per_session // 2), facts))
    rows: list[tuple[str, str, float]] = []
    fact_rows: list[tuple[int, str]] = []
    order = list(range(facts))
    rng.shuffle(order)
    f = 0
    for s in range(sessions):
        t = DAY0 + s * 86400 + 9 * 3600
        for i in range(messages_per_session // 2):
            turn = s * (messages_per_session // 2) + i
            if f < facts and facts_at[f] == turn:
                k = order[f]
                statement, question = FACTS[k % len(FACTS)]
                text = _fill(statement, rng, n=people[k])
                fact_rows.append((len(rows), _fill(question, rng, n=people[k])))
                f += 1
            else:
                text = _fill(rng.choice(FILLER_USER), rng)
            rows.append(("user", text, t))
            rows.append(("assistant", _fill(rng.choice(FILLER_ASSISTANT), rng), t + 30))
            t += 120
    return Conversation(rows, fact_rows)


def filler_messages(n: int, seed: int = 1) -> list[tuple[str, str, float]]:
    """`n` filler messages (for the latency runs), one day per 20."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        role = "user" if i % 2 == 0 else "assistant"
        text = _fill(rng.choice(FILLER_USER if role == "user" else FILLER_ASSISTANT), rng)
        out.append((role, text, DAY0 + (i // 20) * 86400 + (i % 20) * 60))
    return out


def _percentiles(samples: list[float]) -> dict[str, float]:
    a = np.array(samples) * 1000
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99))}


def _page_contents(result: str) -> list[str]:
    if "\n" not in result:
        return []
    return [r["content"] for r in json.loads(result.split("\n", 1)[1])]


def run_retrieval(conv: Conversation, home: Path, console: Console, count_tokens=None) -> dict[str, Any]:
    """recall@5 of conversation_search and archival_memory_search, through the memory functions."""
    from llmos.memory import ArchivalStorage, RecallStorage, default_embedder, open_store
    from llmos.tools.base import ToolContext
    from llmos.tools.memory import memory_tools

    store = open_store(home)
    tools = {t.name: t for t in memory_tools()}
    ctx = ToolContext(pid=0, agent="retrieval", workdir=home, home=home)
    RecallStorage(store, "retrieval").extend(conv.rows)
    texts = [c for _, c, _ in conv.rows]
    t0 = time.perf_counter()
    with console.status(f"embedding {len(texts)} messages into archival storage ..."):
        vectors = default_embedder().encode(texts)
        ArchivalStorage(store, "retrieval").insert_many(texts, vectors=vectors)
    embed_s = time.perf_counter() - t0
    hits = {"conversation_search": 0, "archival_memory_search": 0}
    misses: dict[str, list[str]] = {k: [] for k in hits}
    for row, question in conv.facts:
        fact = conv.rows[row][1]
        for name in hits:
            top = _page_contents(tools[name].fn({"query": question, "request_heartbeat": False}, ctx))
            if fact in top[:5]:
                hits[name] += 1
            else:
                misses[name].append(question)
    n = len(conv.facts)
    tokens = count_tokens([{"role": r, "content": c} for r, c, _ in conv.rows]) if count_tokens else None
    return {"messages": len(conv.rows), "tokens": tokens, "facts": n,
            "recall_at_5": {k: v / n for k, v in hits.items()},
            "misses": {k: v[:5] for k, v in misses.items()},
            "embed_s": embed_s, "embed_per_s": len(texts) / embed_s, "_vectors": vectors}


def run_latency(home: Path, sizes: list[int], base_vectors: np.ndarray, queries: list[str],
                console: Console, seed: int = 0) -> dict[str, Any]:
    """Search latency with `sizes` stored messages. Archival vectors beyond the real ones are the real
    embeddings with Gaussian noise, renormalised (embedding 100k messages would take the run's time)."""
    from llmos.memory import ArchivalStorage, RecallStorage, default_embedder, open_store

    store = open_store(home)
    embedder = default_embedder()
    rng = np.random.default_rng(seed)
    qvecs = embedder.encode(queries)
    rows = filler_messages(max(sizes))
    out: dict[str, Any] = {}
    recall = RecallStorage(store, "latency")
    archival = ArchivalStorage(store, "latency", embedder)
    stored = 0
    for size in sizes:
        with console.status(f"latency with {size} stored messages ..."):
            recall.extend(rows[stored:size])
            need = size - stored
            reps = rng.integers(0, len(base_vectors), need)
            vecs = base_vectors[reps] + rng.normal(scale=0.02, size=(need, base_vectors.shape[1]))
            vecs = (vecs / np.linalg.norm(vecs, axis=1, keepdims=True)).astype(np.float32)
            archival.insert_many([c for _, c, _ in rows[stored:size]], vectors=vecs)
            stored = size
            res: dict[str, Any] = {}
            times = []
            for q in queries:
                t = time.perf_counter()
                recall.search(q)
                times.append(time.perf_counter() - t)
            res["conversation_search"] = _percentiles(times)
            archival.nearest(qvecs[0], 5)  # load the vectors (and build the index, if large) untimed
            for mode, exact in (("exact", True), ("ivf", False)):
                times = []
                for q in qvecs:
                    t = time.perf_counter()
                    archival.nearest(q, 5, exact=exact)
                    times.append(time.perf_counter() - t)
                res[f"archival_vector_search_{mode}"] = _percentiles(times)
            times = []
            for q in queries[:len(queries) // 2]:
                t = time.perf_counter()
                archival.search(q)
                times.append(time.perf_counter() - t)
            res["archival_memory_search"] = _percentiles(times)  # embedding the query included
            res["ivf_in_use"] = size >= archival.ivf_threshold
            if res["ivf_in_use"]:  # below the threshold both searches are the exact one
                agree = [len(set(archival.nearest(q, 5)[0].tolist())
                             & set(archival.nearest(q, 5, exact=True)[0].tolist())) / 5 for q in qvecs]
                res["ivf_recall_vs_exact_on_noisy_copies"] = float(np.mean(agree))
            out[str(size)] = res
    return out


def run_ivf_recall(vectors: np.ndarray, queries: list[str], k: int = 5,
                   nprobes: tuple[int, ...] = (4, 8, 16)) -> dict[str, Any]:
    """recall@k of the inverted-file index against exact search, on real embeddings only: the index is
    built over the conversation's own all-MiniLM-L6-v2 vectors (as archival storage builds it, 2*sqrt(n)
    cells) and queried with the embedded questions, which are not among them; at `nprobes` cells and at
    the default (`default_nprobe`)."""
    from llmos.memory import IVFIndex, default_embedder
    from llmos.memory.archival import top_k

    qvecs = default_embedder().encode(queries)
    index = IVFIndex(vectors)
    default = index.nprobe
    recall = {}
    for nprobe in sorted({*nprobes, default}):
        index.nprobe = nprobe
        found = 0
        for q in qvecs:
            scores = vectors @ q
            kth = scores[top_k(scores, k)[-1]]
            rows = index.candidates(q)
            # a hit is any result as near as the exact k-th (the conversation repeats some messages
            # word for word, and which of two equal vectors comes back is not a miss)
            found += int(np.sum(scores[rows[top_k(scores[rows], k)]] >= kth - 1e-6))
        recall[str(nprobe)] = found / (k * len(qvecs))
    return {"vectors": len(vectors), "queries": len(qvecs), "nlist": index.nlist, "k": k,
            "default_nprobe": default, "recall_vs_exact_by_nprobe": recall}


def run_context(model: str, home: Path, console: Console, messages: int = 2000, window: int = 2048,
                chunk: int = 10, seed: int = 0) -> dict[str, Any]:
    """The MemGPT agent on the embedded model through the kernel until its recall storage holds
    `messages` messages, resuming it every `chunk` user turns (a new process each time)."""
    from llmos.agents import memgpt
    from llmos.kernel import EngineBackend, Kernel
    from llmos.memory import RecallStorage, open_store
    from llmos.tools.base import ToolRegistry
    from llmos.tools.memory import memory_tools

    user_turns = [c for r, c, _ in make_conversation(sessions=400, facts=100, seed=seed).rows if r == "user"]
    tools = ToolRegistry()
    tools.register(*memory_tools())
    settings = {"context_window": window, "reply_tokens": 64, "max_string": 100, "summary_tokens": 96,
                "block_limit": 400, "max_steps": 2}
    store = open_store(home)
    recall = RecallStorage(store, "bench")
    sent: list[str] = []

    async def go() -> None:
        with console.status(f"loading {model} ..."):
            backend = EngineBackend(model)
        kernel = Kernel(backend, home=home, tools=tools)
        try:
            with console.status("") as status:
                while recall.count() < messages:
                    batch = user_turns[len(sent):len(sent) + chunk]
                    sent.extend(batch)
                    pid = await kernel.spawn(memgpt.main, name="bench", args={"message": batch, **settings})
                    await kernel.wait(pid)
                    reason = kernel.process(pid).exit_reason
                    if reason != "exited":
                        raise RuntimeError(f"the agent ended with {reason}")
                    status.update(f"context run: {recall.count()}/{messages} messages ...")
        finally:
            await kernel.shutdown()

    t0 = time.perf_counter()
    asyncio.run(go())
    wall = time.perf_counter() - t0
    row = store.agent("bench")
    total = recall.count()
    stored_user = [m[0] for m in store.query("SELECT content FROM messages WHERE agent = 'bench' AND "
                                             "role = 'user' ORDER BY id")]
    evicted = store.query("SELECT count(*) FROM messages WHERE agent = 'bench' AND in_context = 0")[0][0]
    warnings = store.query("SELECT count(*) FROM messages WHERE agent = 'bench' AND role = 'system' "
                           "AND content LIKE '%Memory pressure%'")[0][0]
    invalid = store.query("SELECT count(*) FROM messages WHERE agent = 'bench' AND role = 'system' "
                          "AND content LIKE '%not a valid function call%'")[0][0]
    calls = [json.loads(m[0])["function"] for m in store.query(
        "SELECT content FROM messages WHERE agent = 'bench' AND role = 'assistant' AND name IS NOT NULL")]
    return {"model": model, "context_window": window, **settings, "messages": total,
            "user_turns": len(sent), "llm_calls": row["llm_calls"], "evictions": row["evictions"],
            "evicted_in_store": evicted, "summaries": row["summaries"], "warnings": warnings,
            "largest_prompt": row["largest_prompt"],
            "largest_prompt_plus_reply": row["largest_prompt"] + settings["reply_tokens"],
            "window_overflows": row["overflows"], "invalid_calls": invalid,
            "calls": {name: calls.count(name) for name in sorted(set(calls))},
            "every_message_in_recall": stored_user == sent and evicted == row["evictions"],
            "wall_s": wall}


SEARCHES = ("conversation_search", "conversation_search_date", "archival_memory_search")


def paging_trials(trials: int, filler: int, seed: int = 0) -> list[dict[str, Any]]:
    """Seeded paging-in trials: a fact told first, `filler` ordinary user turns, then the question; the
    answer is the fact's values the question does not name (all must appear in the reply)."""
    import string

    rng = random.Random(seed)
    out = []
    for k in range(trials):
        statement, question = FACTS[k % len(FACTS)]
        asked = {f for _, f, _, _ in string.Formatter().parse(question) if f}
        fields = [f for _, f, _, _ in string.Formatter().parse(statement) if f and f not in asked]
        values = {f: str(rng.randint(1, 28)) if f == "day" else str(rng.randint(2, 60) * 5) if f == "amount"
                  else f"{rng.randint(1000, 9999)}" if f == "code" else rng.choice(SLOTS[f]) for f in fields}
        name = rng.choice(NAMES)
        out.append({"fact": _fill(statement, rng, n=name, **values), "question": _fill(question, rng, n=name),
                    "answer": list(values.values()),
                    "filler": [_fill(rng.choice(FILLER_USER), rng) for _ in range(filler)]})
    return out


def run_paging(model: str, home: Path, console: Console, trials: int = 10, filler: int = 12,
               window: int = 576, seed: int = 0, backend: Any = None) -> dict[str, Any]:
    """The paging-in task: each trial is a new MemGPT agent on `model` told a fact, then ordinary turns
    until the fact has been evicted from its main context, then asked about it. It can only answer
    right by searching its recall or archival storage; reported: how often the fact was evicted before
    the question (the task's precondition), the agent searched, a search returned the fact, and the
    reply held every value of the answer."""
    from llmos.agents import memgpt
    from llmos.kernel import EngineBackend, Kernel
    from llmos.memory import open_store
    from llmos.tools.base import ToolRegistry
    from llmos.tools.memory import memory_tools

    tools = ToolRegistry()
    tools.register(*memory_tools())
    settings = {"context_window": window, "reply_tokens": 64, "max_string": 100, "summary_tokens": 96,
                "block_limit": 400}
    store = open_store(home)
    rows: list[dict[str, Any]] = []

    async def go() -> None:
        nonlocal backend
        if backend is None:
            with console.status(f"loading {model} ..."):
                backend = EngineBackend(model)
        kernel = Kernel(backend, home=home, tools=tools)
        try:
            for k, trial in enumerate(paging_trials(trials, filler, seed)):
                name = f"paging-{k}"
                error = None
                with console.status(f"paging-in task: trial {k + 1} of {trials} ..."):
                    for batch, steps in (([trial["fact"], *trial["filler"]], 2), ([trial["question"]], 3)):
                        if steps == 3:
                            first = store.query("SELECT max(id) FROM messages WHERE agent = ?", (name,))[0][0]
                            evicted = store.query("SELECT count(*) FROM messages WHERE agent = ? AND role = "
                                                  "'user' AND content = ? AND in_context = 0",
                                                  (name, trial["fact"]))[0][0] > 0
                        pid = await kernel.spawn(memgpt.main, name=name,
                                                 args={"message": batch, "max_steps": steps, **settings})
                        reply = await kernel.wait(pid)
                        if kernel.process(pid).exit_reason != "exited":
                            # the agent failed the trial (its own core memory edits outgrew the window, say)
                            error = kernel.process(pid).exit_reason
                            break
                if error is not None:
                    rows.append({"evicted": False, "calls": [], "search_found_fact": False, "searched": False,
                                 "answered": False, "error": error, "question": trial["question"],
                                 "answer": trial["answer"], "reply": None})
                    continue
                after = store.query("SELECT role, content, name FROM messages WHERE agent = ? AND id > ? "
                                    "ORDER BY id", (name, first))
                calls = [json.loads(c)["function"] for r, c, fn in after if r == "assistant" and fn]
                found = any(r == "tool" and trial["fact"] in c for r, c, _ in after)
                text = (reply or "").lower()
                rows.append({"evicted": evicted, "calls": calls, "search_found_fact": found,
                             "searched": any(c in SEARCHES for c in calls),
                             "answered": all(v.lower() in text for v in trial["answer"]),
                             "question": trial["question"], "answer": trial["answer"], "reply": reply})
        finally:
            await kernel.shutdown(close_backend=False)

    t0 = time.perf_counter()
    asyncio.run(go())
    n = len(rows)
    return {"model": model, "context_window": window, "trials": n, "filler_turns": filler,
            "evicted_before_question": sum(r["evicted"] for r in rows),
            "searched": sum(r["searched"] for r in rows),
            "search_found_fact": sum(r["search_found_fact"] for r in rows),
            "answered": sum(r["answered"] for r in rows),
            "answered_after_searching": sum(r["answered"] and r["searched"] for r in rows),
            "agent_errors": sum("error" in r for r in rows),
            "calls_after_question": dict(sorted(Counter(c for r in rows for c in r["calls"]).items())),
            "per_trial": rows, "wall_s": time.perf_counter() - t0}


def run_memory_bench(console: Console, quick: bool = False, model: str = "smollm2-135m-instruct",
                     json_path: str | None = None, context: bool = True, messages: int | None = None,
                     window: int = 2048, seed: int = 0, paging_trials: int | None = None) -> dict[str, Any]:
    """Retrieval, latency, the paging-in task (`paging_trials` trials; 0 leaves it out) and (unless
    `context` is False) the context run; prints tables, writes JSON."""
    import tempfile

    from llmos.models.gguf_file import read_gguf_file
    from llmos.models.registry import resolve_model
    from llmos.models.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf_fields(read_gguf_file(resolve_model(model)).fields)
    sessions, facts, sizes = (20, 20, [1_000, 5_000]) if quick else (200, 100, [10_000, 100_000])
    report: dict[str, Any] = {"bench": "memory", "quick": quick, "seed": seed}
    with tempfile.TemporaryDirectory(prefix="llmos-bench-memory-") as tmp:
        home = Path(tmp)
        conv = make_conversation(sessions=sessions, facts=facts, seed=seed)
        retrieval = run_retrieval(conv, home, console, lambda m: len(tok.encode_chat(m)))
        vectors = retrieval.pop("_vectors")
        report["retrieval"] = {"sessions": sessions, **retrieval}
        queries = [q for _, q in conv.facts]
        report["latency"] = run_latency(home, sizes, vectors, (queries * 5)[:30 if quick else 100], console)
        report["latency_note"] = ("archival vectors beyond the conversation's own are its real embeddings "
                                  "plus Gaussian noise (sigma 0.02), renormalised: latency only, the "
                                  "recall on these clustered copies says little about the index")
        report["ivf_real"] = run_ivf_recall(vectors, queries)
        if context:
            report["context"] = run_context(model, home, console, messages or (60 if quick else 2000), window,
                                            seed=seed)
        trials = (2 if quick else 20) if paging_trials is None else paging_trials
        if trials and (context or paging_trials):
            report["paging"] = run_paging(model, home / "paging", console, trials=trials, seed=seed)
    _print(console, report)
    write_report(report, json_path, "docs/bench/memory.json", console)
    return report


def _print(console: Console, report: dict[str, Any]) -> None:
    r = report["retrieval"]
    t = Table(title=f"retrieval: {r['facts']} facts in {r['messages']} messages ({r['tokens']} tokens, "
                    f"{r['sessions']} sessions)")
    t.add_column("function")
    t.add_column("recall@5", justify="right")
    for name, v in r["recall_at_5"].items():
        t.add_row(name, f"{v:.2f}")
    console.print(t)
    t = Table(title="search latency (ms)")
    for col in ("stored messages", "search", "p50", "p99"):
        t.add_column(col, justify="right" if col in ("p50", "p99") else "left")
    for size, res in report["latency"].items():
        for name in ("conversation_search", "archival_memory_search", "archival_vector_search_exact",
                     "archival_vector_search_ivf"):
            t.add_row(size, name, f"{res[name]['p50_ms']:.2f}", f"{res[name]['p99_ms']:.2f}")
    console.print(t)
    v = report["ivf_real"]
    t = Table(title=f"approximate index on real embeddings: {v['vectors']} messages, {v['nlist']} cells, "
                    f"{v['queries']} questions")
    t.add_column("cells scanned (nprobe)")
    t.add_column(f"recall@{v['k']} vs exact", justify="right")
    for nprobe, value in v["recall_vs_exact_by_nprobe"].items():
        t.add_row(nprobe + (" (the default)" if int(nprobe) == v["default_nprobe"] else ""), f"{value:.3f}")
    console.print(t)
    if "context" in report:
        c = report["context"]
        t = Table(title=f"context run: the MemGPT agent on {c['model']}, {c['context_window']}-token window")
        t.add_column("measure")
        t.add_column("value", justify="right")
        for key in ("messages", "user_turns", "llm_calls", "warnings", "evictions", "summaries",
                    "largest_prompt", "largest_prompt_plus_reply", "window_overflows", "invalid_calls",
                    "every_message_in_recall", "wall_s"):
            value = c[key]
            t.add_row(key, f"{value:.1f}" if isinstance(value, float) else str(value))
        console.print(t)
    if "paging" in report:
        p = report["paging"]
        t = Table(title=f"paging-in task: the MemGPT agent on {p['model']}, {p['context_window']}-token "
                        f"window, a fact, {p['filler_turns']} turns, then the question")
        t.add_column("measure")
        t.add_column(f"of {p['trials']} trials", justify="right")
        for key in ("evicted_before_question", "searched", "search_found_fact", "answered",
                    "answered_after_searching", "agent_errors"):
            t.add_row(key, str(p[key]))
        console.print(t)
        console.print(f"functions the agent called after the question: {p['calls_after_question']}")
