"""A chat agent: holds a conversation and answers each prompt in turn."""

from __future__ import annotations

from llmos.kernel.api import Syscalls

DEFAULT_PROMPTS = ["What does an operating system do?", "Name one thing a scheduler decides."]


async def main(sys: Syscalls, prompts: list[str] | str | None = None, system: str | None = None,
               max_tokens: int = 96) -> str:
    """Answer `prompts` one after another, keeping the history; returns the last answer."""
    prompts = [prompts] if isinstance(prompts, str) else prompts or DEFAULT_PROMPTS
    history = [{"role": "system", "content": system}] if system else []
    answer = ""
    for prompt in prompts:
        history.append({"role": "user", "content": prompt})
        answer = (await sys.llm_chat(history, max_tokens=max_tokens)).text.strip()
        history.append({"role": "assistant", "content": answer})
        sys.print(f"Q: {prompt}\nA: {answer}")
    return answer
