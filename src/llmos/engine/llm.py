"""Offline batch API: `LLM(model).generate(prompts, SamplingParams)`, as in vLLM."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from llmos.engine.config import EngineConfig
from llmos.engine.engine import LLMEngine
from llmos.engine.outputs import RequestOutput
from llmos.engine.sampling_params import SamplingParams
from llmos.models.loader import LoadedModel


class LLM:
    def __init__(self, model: str | LoadedModel = "smollm2-135m-instruct",
                 config: EngineConfig | None = None, **kwargs) -> None:
        self.engine = LLMEngine(model, config, **kwargs)
        self.tokenizer = self.engine.tokenizer

    def generate(
        self,
        prompts: str | list[int] | Sequence[str | list[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        priorities: Sequence[int] | None = None,
        on_step: Callable[[list[RequestOutput]], None] | None = None,
    ) -> list[RequestOutput]:
        """Run prompts (text or token ids) to completion; outputs in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        ids = [
            self.engine.add_request(p, sp, priority=priorities[i] if priorities else 0)
            for i, (p, sp) in enumerate(zip(prompts, params, strict=True))
        ]
        final: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished_requests():
            outs = self.engine.step()
            for o in outs:
                if o.finished:
                    final[o.request_id] = o
            if on_step:
                on_step(outs)
        return [final[i] for i in ids]

    def chat(self, conversations: Sequence[list[dict]], params: SamplingParams | None = None,
             **kwargs) -> list[RequestOutput]:
        """Generate replies to chats rendered with the model's chat template."""
        prompts = [self.tokenizer.encode_chat(c) for c in conversations]
        return self.generate(prompts, params, **kwargs)

