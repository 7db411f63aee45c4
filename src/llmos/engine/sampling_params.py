"""Sampling parameters of one request, validated once when the request arrives.

Every number must be finite and in range, so no request can push the
sampler into overflow (a tiny temperature is greedy decoding, as in vLLM).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

GREEDY_BELOW = 1e-5  # a temperature under this samples greedily (dividing by it would overflow)


class InvalidRequestError(ValueError):
    """A request the engine refuses; the message names the bad field and why."""


@dataclass
class SamplingParams:
    n: int = 1
    max_tokens: int | None = 16  # None: up to the model's context length
    temperature: float = 1.0  # under GREEDY_BELOW (0 included) means greedy
    top_k: int = 0  # 0 or -1: off
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # also return this many top logprobs per token
    skip_special_tokens: bool = True
    detokenize: bool = True  # False: token ids only (benchmarks); stop strings then never match
    grammar: str | None = None  # an llguidance grammar (Lark syntax) the output must match
    json_schema: dict[str, Any] | None = None  # or a JSON schema the output must satisfy
    min_p: float = 0.0  # drop tokens below min_p times the most likely token's probability
    presence_penalty: float = 0.0  # subtracted from the logit of every token already generated
    frequency_penalty: float = 0.0  # subtracted once per time a token was generated
    repetition_penalty: float = 1.0  # divides positive (multiplies negative) logits of tokens seen
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.top_k == -1:
            self.top_k = 0
        floats = {"temperature": self.temperature, "top_p": self.top_p, "min_p": self.min_p,
                  "presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
                  "repetition_penalty": self.repetition_penalty, **{f"logit_bias[{k}]": v
                                                                    for k, v in self.logit_bias.items()}}
        for name, value in floats.items():
            if not math.isfinite(value):
                raise InvalidRequestError(f"{name} must be a finite number, got {value}")
        checks = [
            (isinstance(self.n, int) and self.n >= 1, f"n must be at least 1, got {self.n}"),
            (self.max_tokens is None or self.max_tokens >= 1,
             f"max_tokens must be at least 1, got {self.max_tokens}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, f"top_k must be -1, 0 or positive, got {self.top_k}"),
            (self.logprobs is None or 0 <= self.logprobs <= 20,
             f"logprobs must be between 0 and 20, got {self.logprobs}"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (-2 <= self.presence_penalty <= 2,
             f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2 <= self.frequency_penalty <= 2,
             f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (0 < self.repetition_penalty <= 2,
             f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}"),
            (all(-100 <= v <= 100 for v in self.logit_bias.values()),
             "logit_bias values must be in [-100, 100]"),
            (self.grammar is None or self.json_schema is None, "give a grammar or a json_schema, not both"),
            (self.json_schema is None or isinstance(self.json_schema, dict), "json_schema must be an object"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidRequestError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def penalised(self) -> bool:
        """Whether the output so far changes the logits (presence, frequency or repetition)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)
