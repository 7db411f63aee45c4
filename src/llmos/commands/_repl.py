"""The terminal chat of `llmos chat`: a read-eval-print loop like Ollama's and llama-cli's.

Guarantees: lines are edited and recalled with the stdlib readline (history kept
in the llmos home's `chat_history`); a line starting with "/" is a command for
the CLI (/help, /clear, /exit), never sent to the model; Ctrl-C during a reply
stops that reply between two engine steps (the request is aborted and its KV
blocks freed, the engine stays consistent) and the session goes on; Ctrl-C at
the prompt clears the line; Ctrl-D or /exit ends the session.
"""

from __future__ import annotations

import signal
import sys
from typing import Any

from llmos.commands._common import console, err

COMMANDS = {"/help": "this list", "/clear": "forget the conversation (the --system message stays)",
            "/exit": "leave (also /quit, /bye or Ctrl-D)"}
_EXIT = ("/exit", "/quit", "/bye")


class _Stopped(Exception):
    """Ctrl-C arrived while a reply was being generated."""


def _readline_history() -> Any:
    """Turn on line editing and load the history; the path to save it to, or None without a terminal."""
    if not sys.stdin.isatty():
        return None
    try:
        import readline
    except ImportError:  # a Python built without readline: plain input still works
        return None
    from llmos.home import llmos_home

    path = llmos_home() / "chat_history"
    try:
        readline.read_history_file(path)
    except OSError:
        pass
    readline.set_history_length(1000)
    return path


def _save_history(path: Any) -> None:
    import readline

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        readline.write_history_file(path)
    except OSError as e:
        err.print(f"[dim]chat history not saved: {e}[/]")


def generate_reply(llm: Any, ids: list[int], params: Any) -> tuple[str, bool]:
    """Stream one reply to stdout; (its text, whether Ctrl-C stopped it)."""
    stop = False
    text = ""

    def on_sigint(signum: int, frame: Any) -> None:
        nonlocal stop
        stop = True

    def on_step(outputs: list[Any]) -> None:
        nonlocal text
        for o in outputs:
            new = o.outputs[0].text
            sys.stdout.write(new[len(text):])
            sys.stdout.flush()
            text = new
        if stop:
            raise _Stopped

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        llm.generate(ids, params, on_step=on_step)
    except _Stopped:
        for request_id in list(llm.engine.requests):
            llm.engine.abort_request(request_id)
        return text, True
    finally:
        signal.signal(signal.SIGINT, previous)
    return text, False


def chat_loop(llm: Any, params: Any, system: str | None, max_tokens: int) -> None:
    """Talk with `llm` until /exit or Ctrl-D, keeping the conversation (trimmed to the window)."""
    from llmos.engine import InvalidRequestError

    history_file = _readline_history()
    base = [{"role": "system", "content": system}] if system else []
    history = list(base)
    prompt = "\001\033[1;32m\002you>\001\033[0m\002 " if sys.stdout.isatty() else "you> "
    console.print("[dim]Type a message; /help lists the commands. Ctrl-C stops a reply; Ctrl-D or /exit "
                  "leaves.[/]")
    try:
        while True:
            try:
                line = input(prompt).strip()
            except EOFError:
                print()
                break
            except KeyboardInterrupt:
                print()
                continue
            if not line:
                continue
            if line.startswith("/"):
                command = line.split()[0].lower()
                if command in _EXIT:
                    break
                if command == "/help":
                    for name, what in COMMANDS.items():
                        console.print(f"  {name:<7} {what}", highlight=False)
                elif command == "/clear":
                    history = list(base)
                    console.print("[dim]conversation cleared[/]")
                else:
                    err.print(f"unknown command {command}; /help lists the commands", highlight=False)
                continue
            history.append({"role": "user", "content": line})
            ids = llm.tokenizer.encode_chat(history)
            # The window is finite: drop the oldest turns (never the system message) until it fits.
            while len(ids) + max_tokens > llm.engine.max_model_len and len(history) > 1 + len(base):
                del history[len(base)]
                ids = llm.tokenizer.encode_chat(history)
            sys.stdout.write("llmos> ")
            try:
                reply, stopped = generate_reply(llm, ids, params)
            except InvalidRequestError as e:
                err.print(f"[bold red]error:[/] {e}")
                history.pop()
                continue
            print()
            if stopped:
                console.print("[dim](reply stopped)[/]")
            history.append({"role": "assistant", "content": reply})
    finally:
        if history_file is not None:
            _save_history(history_file)
