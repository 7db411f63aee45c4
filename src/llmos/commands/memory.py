"""Commands of virtual context memory: `llmos bench memory`, and the persistent MemGPT chat
(`chat_with_agent`, which `llmos chat --agent NAME` runs)."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer
from rich.console import Console

console = Console()


def chat_with_agent(agent: str, model: str = "smollm2-135m-instruct", backend_url: str | None = None,
                    api_key: str | None = None, context_window: int | None = None) -> None:
    """Chat in the terminal with the persistent MemGPT agent `agent` until EOF or /exit.

    Each line runs the agent as a kernel process that resumes its memory (core memory, summary,
    message queue, recall and archival storage under the llmos home), so the chat goes on where
    the last run left it. The kernel is the one `llmos run` boots: tools behind the reference monitor.
    """
    import asyncio

    from llmos.agents import memgpt
    from llmos.commands.kernel import protected_kernel
    from llmos.kernel import EngineBackend, OpenAIBackend

    if not agent or not agent.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"agent name must be letters, digits, '-' or '_', got {agent!r}")
    if backend_url is None:
        from llmos.commands.kernel import server_client

        if (server := server_client()) is not None:
            chat_on_server(server, agent)
            return

    async def go() -> None:
        with console.status(f"loading {model} ..."):
            backend = (OpenAIBackend(backend_url, api_key, model) if backend_url else EngineBackend(model))
        kernel = protected_kernel(backend)  # every memory function passes the reference monitor
        console.print(f"[dim]Agent [bold]{agent}[/bold] ({model}); type a message, /exit leaves.[/]")
        try:
            while True:
                console.print("[bold green]you>[/] ", end="")
                line = await asyncio.to_thread(sys.stdin.readline)
                if not line:
                    break
                line = line.strip()
                if line in ("/exit", "/quit"):
                    break
                if not line:
                    continue
                args = {"message": line}
                if context_window:
                    args["context_window"] = context_window
                with console.status("thinking ..."):
                    pid = await kernel.spawn(memgpt.main, name=agent, args=args)
                    reply = await kernel.wait(pid)
                reason = kernel.process(pid).exit_reason
                if reason != "exited":
                    console.print(f"[bold red]error:[/] the agent ended: {reason}")
                    continue
                console.print(f"[bold cyan]{agent}>[/] ", end="")
                console.print(reply if reply else "[dim](no message)[/]", markup=not reply, highlight=False)
        finally:
            await kernel.shutdown()

    try:
        asyncio.run(go())
    except KeyboardInterrupt:
        pass


def chat_on_server(server: Any, agent: str) -> None:
    """The same chat with the agent `agent` of the running llmos server (its agents API): the agent is
    created there on first use, and each line is one message, scheduled by the server's kernel."""
    found = server.call("GET", "/v1/agents/", params={"name": agent, "limit": 1})
    agent_id = found[0]["id"] if found else server.call("POST", "/v1/agents/", json={"name": agent})["id"]
    console.print(f"[dim]Agent [bold]{agent}[/bold] on {server.url}; type a message, /exit leaves.[/]")
    while True:
        console.print("[bold green]you>[/] ", end="")
        line = sys.stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            break
        if not (line := line.strip()):
            continue
        with console.status("thinking ..."):
            out = server.call("POST", f"/v1/agents/{agent_id}/messages",
                              json={"messages": [{"role": "user", "content": line}]}, timeout=600)
        replies = [m["content"] for m in out["messages"] if m.get("message_type") == "assistant_message"]
        console.print(f"[bold cyan]{agent}>[/] ", end="")
        console.print("\n".join(replies) if replies else "[dim](no message)[/]", markup=not replies,
                      highlight=False)


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    @bench_app.command("memory")
    def bench_memory(
        quick: Annotated[bool, typer.Option(help="Shrink the work (20 sessions, 1k/5k messages, 60-message "
                                                 "context run).")] = False,
        model: Annotated[str, typer.Option("--model", "-m", help="Model of the context run.")]
        = "smollm2-135m-instruct",
        output: Annotated[str | None, typer.Option("--json", help="Where to write the JSON results.")] = None,
        context: Annotated[bool, typer.Option(help="Also run the agent on the model (the context run).")]
        = True,
        messages: Annotated[int | None, typer.Option(help="Messages in the context run (default 2000).")]
        = None,
        window: Annotated[int, typer.Option(help="Context window of the context run, in tokens.")] = 2048,
        paging_trials: Annotated[int | None, typer.Option(
            help="Trials of the paging-in task (default 20, 2 with --quick; runs with --no-context too "
                 "when given).")] = None,
    ) -> None:
        """Virtual context (MemGPT): retrieval recall@5, search latency, and an agent paging its context.

        Example: llmos bench memory --quick
        """
        from llmos.bench.virtual_context import run_memory_bench

        run_memory_bench(console, quick=quick, model=model, json_path=output, context=context,
                         messages=messages, window=window, paging_trials=paging_trials)
