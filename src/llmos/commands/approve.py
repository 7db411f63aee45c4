"""`llmos approvals | approve ID | deny ID`: decide the tool calls waiting for a person.

These talk to the running server of the llmos home (or `--url`), whose kernel
holds the parked calls; the agent resumes with the decision as its tool's result.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from llmos.commands._common import console, fail
from llmos.commands.kernel import KeyOpt, UrlOpt, server_client

ReasonOpt = Annotated[str, typer.Option("--reason", help="Why (the agent reads it with the decision).")]


def _client(url: str | None, key: str | None) -> Any:
    client = server_client(url, key)
    if client is None:
        fail("no llmos server runs on this home (start one with `llmos serve`, or give --url)")
    return client


def _line(a: dict[str, Any]) -> str:
    return f"{a['id']}  pid {a['pid']} ({a['agent']})  {a['tool']} {json.dumps(a['args'])}  {a['state']}"


def approvals(url: UrlOpt = None, api_key: KeyOpt = None,
              all: Annotated[bool, typer.Option("--all", help="Also the recently decided.")] = False) -> None:
    """List the tool calls waiting for approval.

    Example: llmos approvals
    """
    rows = _client(url, api_key).call("GET", "/v1/approvals", params={"all": all})["data"]
    if not rows:
        console.print("no calls wait for approval")
    for a in rows:
        print(_line(a))


def approve(approval_id: Annotated[str, typer.Argument(help="The approval's id (see `llmos approvals`).")],
            reason: ReasonOpt = "", url: UrlOpt = None, api_key: KeyOpt = None) -> None:
    """Approve a parked tool call: it runs, and the agent gets its result.

    Example: llmos approve 3f9c2a1b7d0e4c55
    """
    a = _client(url, api_key).call("POST", f"/v1/approvals/{approval_id}/approve", json={"reason": reason})
    print(_line(a))


def deny(approval_id: Annotated[str, typer.Argument(help="The approval's id (see `llmos approvals`).")],
         reason: ReasonOpt = "", url: UrlOpt = None, api_key: KeyOpt = None) -> None:
    """Deny a parked tool call: the agent gets a denial (with your reason) as its result.

    Example: llmos deny 3f9c2a1b7d0e4c55 --reason "not this account"
    """
    a = _client(url, api_key).call("POST", f"/v1/approvals/{approval_id}/deny", json={"reason": reason})
    print(_line(a))


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    app.command()(approvals)
    app.command()(approve)
    app.command()(deny)
