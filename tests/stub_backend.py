"""A kernel backend without a model, for agent-loop tests: a subclass says what `complete` answers."""

from typing import Any


class StubBackend:
    context_window = 8192

    def attach(self, sched, on_switch) -> None:
        pass

    def count_tokens(self, messages: list[dict[str, Any]]) -> int:
        return 0

    async def complete(self, call, prompt, params, on_tokens, context=None):
        raise AssertionError("no LLM call expected")

    async def run_in_scheduler(self, fn):
        return fn()

    async def stats(self) -> dict:
        return {}

    def close(self) -> None:
        pass
