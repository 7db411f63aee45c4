"""A user's own tools (an MCP server's) are invisible to other users' agents and API calls."""

import asyncio

from llmos.kernel import Kernel
from llmos.tools.base import Tool, ToolRegistry
from tests.stub_backend import StubBackend

PARAMS = {"type": "object", "properties": {}}


def _registry() -> ToolRegistry:
    reg = ToolRegistry()
    reg.register(Tool("calculator", "everyone's", PARAMS, lambda a, c: "1"))
    reg.register(Tool("mcp.mine.lookup", "alice's", PARAMS, lambda a, c: "2", owner="alice"))
    return reg


def test_specs_and_visible_filter_by_owner():
    reg = _registry()
    assert [s["function"]["name"] for s in reg.specs(user="bob")] == ["calculator"]
    assert [s["function"]["name"] for s in reg.specs(user="alice")] == ["calculator", "mcp.mine.lookup"]
    assert sorted(reg.visible(None)) == ["calculator", "mcp.mine.lookup"]  # an admin
    assert sorted(reg.visible("bob")) == ["calculator"]


def test_an_agent_sees_only_its_users_tools(tmp_path):
    async def names(sys) -> list[str]:
        return [s["function"]["name"] for s in sys.tools()]

    async def main():
        async with Kernel(StubBackend(), home=tmp_path, tools=_registry(), monitor="allow-all") as kernel:
            seen = {}
            for owner in ("alice", "bob"):
                seen[owner] = await kernel.wait(await kernel.spawn(names, owner=owner))
            return seen

    assert asyncio.run(main()) == {"alice": ["calculator", "mcp.mine.lookup"], "bob": ["calculator"]}
