"""The official letta-client, unchanged but for its base_url, against a real llmos server running the
embedded model: the tour of the agents API, and /v1/models for both the OpenAI and the Letta client."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from letta_client import Letta, NotFoundError

from llmos.server import create_app
from llmos.server.system import boot
from tests.server.conftest import MODEL
from tests.server.scripted_server import serve

STEPS = 2  # steps per message: bounds each test's model time
PERSONA = "I am Sam. I answer in one short sentence."


@pytest.fixture(scope="module")
def url(tmp_path_factory) -> Iterator[str]:
    system = boot(tmp_path_factory.mktemp("home"), model=MODEL, kv_budget="128MiB")
    server, thread, base = serve(create_app(system=system))
    yield base
    server.should_exit = True
    thread.join(timeout=10)
    asyncio.run(system.aclose())


@pytest.fixture(scope="module")
def letta(url: str) -> Letta:
    return Letta(base_url=url, max_retries=0, timeout=300)


def hello(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_models_for_both_clients(url: str, letta: Letta):
    models = openai.OpenAI(base_url=f"{url}/v1", api_key="unused").models.list()
    assert MODEL in [m.id for m in models.data]
    (card,) = letta.models.list()
    assert (card.handle, card.model, card.name) == (f"llmos/{MODEL}", MODEL, MODEL)
    assert card.context_window == card.max_context_window > 0


def test_agent_lifecycle_messages_and_memory(letta: Letta, url: str):
    agent = letta.agents.create(
        name="tour", model=f"llmos/{MODEL}", max_tokens=80, tags=["demo"], metadata={"team": "os"},
        memory_blocks=[{"label": "persona", "value": PERSONA, "limit": 500},
                       {"label": "human", "value": "Name: Ann", "limit": 200}])
    assert agent.id.startswith("agent-") and agent.name == "tour" and agent.tags == ["demo"]
    assert [(b.label, b.value) for b in agent.memory.blocks] == [
        ("persona", PERSONA), ("human", "Name: Ann")]
    assert "send_message" in [t.name for t in agent.tools]
    assert agent.id in [a.id for a in letta.agents.list(tags=["demo"])]
    assert letta.agents.update(agent.id, name="tour2").name == "tour2"
    assert letta.agents.retrieve(agent.id).metadata == {"team": "os"}
    # curl's path without the trailing slash lists the same agents
    assert agent.id in [a["id"] for a in httpx.get(f"{url}/v1/agents").json()]

    reply = letta.agents.messages.create(agent.id, messages=hello("Hi, I am Ann."), max_steps=STEPS)
    kinds = [m.message_type for m in reply.messages]
    assert "assistant_message" in kinds, kinds  # every message is answered (the reply guarantee)
    assert reply.stop_reason.stop_reason == "end_turn"
    assert 1 <= reply.usage.step_count <= STEPS and reply.usage.total_tokens > reply.usage.prompt_tokens > 0

    events = list(letta.agents.messages.create(agent.id, messages=hello("What is my name?"), max_steps=STEPS,
                                               streaming=True))
    kinds = [e.message_type for e in events]
    assert kinds[-2:] == ["stop_reason", "usage_statistics"] and "assistant_message" in kinds, kinds
    streamed = [e.content for e in events if e.message_type == "assistant_message"]

    history = list(letta.agents.messages.list(agent.id, order="asc"))
    users = [m.content for m in history if m.message_type == "user_message"]
    assert users == ["Hi, I am Ann.", "What is my name?"]
    said = [m.content for m in history if m.message_type == "assistant_message"]
    assert said[-len(streamed):] == streamed and said[:-len(streamed)] == [
        m.content for m in reply.messages if m.message_type == "assistant_message"]
    newest = list(letta.agents.messages.list(agent.id, limit=1))
    assert newest[0].id == history[-1].id  # default order: newest first

    block = letta.agents.blocks.update("human", agent_id=agent.id, value="Name: Ann\nLikes: tea")
    assert block.value == "Name: Ann\nLikes: tea"
    assert [b.label for b in letta.agents.blocks.list(agent.id)] == ["persona", "human"]
    assert letta.agents.blocks.retrieve("human", agent_id=agent.id).value == "Name: Ann\nLikes: tea"

    run = letta.agents.messages.create_async(agent.id, messages=hello("Thanks!"), max_steps=STEPS)
    assert run.status in ("created", "running")
    while (run := letta.runs.retrieve(run.id)).status in ("created", "running"):
        time.sleep(0.2)
    assert run.status == "completed" and run.stop_reason == "end_turn"
    assert "assistant_message" in [m.message_type for m in letta.runs.messages.list(run.id)]

    letta.agents.messages.reset(agent.id)
    assert list(letta.agents.messages.list(agent.id)) == []
    letta.agents.delete(agent.id)
    with pytest.raises(NotFoundError):
        letta.agents.retrieve(agent.id)


def test_passages_tools_export_and_import(letta: Letta):
    agent = letta.agents.create(name="archivist", memory_blocks=[{"label": "human", "value": "Name: Bo"}])
    facts = ["My cat is called Miso.", "I was born in Lyon.", "My favourite colour is green."]
    ids = [letta.agents.passages.create(agent.id, text=t)[0].id for t in facts]
    assert [p.text for p in letta.agents.passages.list(agent.id)] == facts
    found = letta.agents.passages.search(agent.id, query="what is the name of my pet?", top_k=2)
    assert found.count == 2 and found.results[0].content == "My cat is called Miso."
    letta.agents.passages.delete(ids[1], agent_id=agent.id)
    assert [p.text for p in letta.agents.passages.list(agent.id)] == [facts[0], facts[2]]
    with pytest.raises(NotFoundError):
        letta.agents.passages.delete(ids[1], agent_id=agent.id)

    assert {"send_message", "archival_memory_search", "calculator"} <= {t.name for t in letta.tools.list()}
    attached = letta.agents.tools.attach("tool-calculator", agent_id=agent.id)
    assert "calculator" in [t.name for t in attached.tools]
    assert "calculator" in [t.name for t in letta.agents.tools.list(agent.id)]
    detached = letta.agents.tools.detach("tool-calculator", agent_id=agent.id)
    assert "calculator" not in [t.name for t in detached.tools]

    letta.agents.messages.create(agent.id, messages=hello("Hello"), max_steps=1)
    exported = letta.agents.export_file(agent.id)
    data = json.loads(exported)
    assert data["agent"]["name"] == "archivist" and len(data["passages"]) == 2
    imported = letta.agents.import_file(file=("archivist.json", exported.encode()), name="copy")
    (copy_id,) = imported.agent_ids
    copy = letta.agents.retrieve(copy_id)
    assert copy.id != agent.id and copy.name == "copy"
    assert [(b.label, b.value) for b in copy.blocks] == [("human", "Name: Bo")]
    original = [(m.message_type, m.id) for m in letta.agents.messages.list(agent.id, order="asc")]
    copied = [m.message_type for m in letta.agents.messages.list(copy_id, order="asc")]
    assert copied == [kind for kind, _ in original] and copied[0] == "user_message"
    assert letta.agents.passages.search(copy_id, query="pet", top_k=1).results[0].content == facts[0]
    for a in (agent.id, copy_id):
        letta.agents.delete(a)
    assert agent.id not in [a.id for a in letta.agents.list()]
