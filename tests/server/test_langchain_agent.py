"""A LangChain agent (langchain-openai's ChatOpenAI, LangChain's create_agent) with two tools runs
against the server to completion: tool calls out, tool results in, a final answer."""

import json

import pytest
from langchain.agents import create_agent
from langchain.agents.middleware import ModelRequest, wrap_model_call
from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI

from tests.server.conftest import MODEL


@tool
def get_weather(city: str) -> str:
    """Current weather in a city."""
    return json.dumps({"city": city, "temperature_c": 21, "sky": "sunny"})


@tool
def get_time(city: str) -> str:
    """Current local time in a city."""
    return json.dumps({"city": city, "time": "14:05"})


@wrap_model_call
def each_tool_once(request: ModelRequest, handler):
    """The small model calls each tool once, in turn (named tool_choice), then answers (none)."""
    called = {m.name for m in request.messages if isinstance(m, ToolMessage)}
    todo = [t.name for t in request.tools if t.name not in called]
    choice = {"type": "function", "function": {"name": todo[0]}} if todo else "none"
    return handler(request.override(tool_choice=choice))


@pytest.mark.parametrize("streaming", [False, True])
def test_two_tool_agent_runs_to_completion(server, streaming):
    model = ChatOpenAI(model=MODEL, base_url=f"{server.url}/v1", api_key="unused", temperature=0,
                       max_tokens=40, max_retries=0, streaming=streaming)
    agent = create_agent(model, tools=[get_weather, get_time], middleware=[each_tool_once],
                         system_prompt="You are a helpful assistant. Use the tools.")
    question = {"role": "user", "content": "What is the weather and the time in Paris?"}
    result = agent.invoke({"messages": [question]}, {"recursion_limit": 12})
    messages = result["messages"]
    calls = [c for m in messages if isinstance(m, AIMessage) for c in m.tool_calls]
    assert [c["name"] for c in calls] == ["get_weather", "get_time"]
    assert all(set(c["args"]) == {"city"} and isinstance(c["args"]["city"], str) for c in calls)
    results = [m for m in messages if isinstance(m, ToolMessage)]
    assert [m.tool_call_id for m in results] == [c["id"] for c in calls]
    assert json.loads(results[1].content)["time"] == "14:05"
    final = messages[-1]
    assert isinstance(final, AIMessage) and not final.tool_calls and final.content.strip()
    assert not server.llm.engine.requests
