"""`llmos mcp add | list | refresh | approve | remove`: MCP servers whose tools become pinned syscalls.

These talk to the running server of the llmos home (or `--url`): its kernel
registers the tools as `mcp.<server>.<tool>`, which agents call only with a
grant for them.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from llmos.commands._common import console
from llmos.commands.approve import _client
from llmos.commands.kernel import KeyOpt, UrlOpt

mcp_app = typer.Typer(no_args_is_help=True, help="MCP servers: their tools as syscalls, pinned by hash.")
NameArg = Annotated[str, typer.Argument(help="The server's name (lower case, digits, - and _).")]
CommandArg = Annotated[list[str] | None, typer.Argument(help="The stdio server's command, after --.")]


def _print(server: dict[str, Any]) -> None:
    where = server["url"] or " ".join(server["command"])
    print(f"{server['name']} ({server['transport']}, owner {server['owner']}): {where}")
    for t in server["tools"]:
        line = f"  {t['syscall']}  sha256 {t['digest'][:16]}"
        if t["changed"]:
            line += (f"  CHANGED ({', '.join(t['changed'])}): refused until "
                     f"`llmos mcp approve {server['name']} {t['tool']}`")
        print(line)


@mcp_app.command("add")
def add(name: NameArg,
        command: CommandArg = None,
        server_url: Annotated[str | None, typer.Option("--server-url", help="A streamable HTTP MCP server on "
                                                       "loopback, e.g. http://127.0.0.1:8000/mcp.")] = None,
        env: Annotated[list[str] | None, typer.Option("--env", help="KEY=VALUE for a stdio server.")] = None,
        url: UrlOpt = None, api_key: KeyOpt = None) -> None:
    """Register an MCP server and pin its tools' definitions.

    Examples: llmos mcp add files -- python my_server.py
              llmos mcp add web --server-url http://127.0.0.1:8000/mcp
    """
    pairs = dict(p.split("=", 1) for p in env or [] if "=" in p)
    body = {"name": name, "command": command or None, "env": pairs, "url": server_url}
    server = _client(url, api_key).call("POST", "/v1/mcp/servers", json=body)
    console.print(f"registered [bold]{name}[/]: {len(server['tools'])} tools pinned "
                  "(grant them to agents by their syscall names)")
    _print(server)


@mcp_app.command("list")
def list_(url: UrlOpt = None, api_key: KeyOpt = None) -> None:
    """The registered MCP servers, their tools' pins and any change waiting for approval."""
    servers = _client(url, api_key).call("GET", "/v1/mcp/servers")["data"]
    if not servers:
        console.print("no MCP servers registered")
    for s in servers:
        _print(s)


@mcp_app.command("refresh")
def refresh(name: NameArg, url: UrlOpt = None, api_key: KeyOpt = None) -> None:
    """Ask the server for its tools now: new ones are pinned, changed ones are shown."""
    _print(_client(url, api_key).call("POST", f"/v1/mcp/servers/{name}/refresh"))


@mcp_app.command("approve")
def approve(name: NameArg, tool: Annotated[str, typer.Argument(help="The tool's name on the server.")],
            url: UrlOpt = None, api_key: KeyOpt = None) -> None:
    """Pin a tool's changed definition (after reading it): its calls are allowed again."""
    _print(_client(url, api_key).call("POST", f"/v1/mcp/servers/{name}/tools/{tool}/approve"))


@mcp_app.command("remove")
def remove(name: NameArg, url: UrlOpt = None, api_key: KeyOpt = None) -> None:
    """Unregister a server; its tools leave the kernel."""
    _client(url, api_key).call("DELETE", f"/v1/mcp/servers/{name}")
    print(f"removed {name}")


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    app.add_typer(mcp_app, name="mcp")
