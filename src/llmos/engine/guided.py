"""Grammar-constrained decoding: a per-request token mask applied before sampling.

A request with a grammar (JSON schema, regex or Lark, compiled by llguidance)
gets a matcher that says which tokens may come next; disallowed tokens get
-inf logits, so the output parses by construction. Requests without a grammar
pay nothing: the sampler only looks for matchers on the sequences that have one.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

from llmos.engine.sampling_params import InvalidRequestError
from llmos.models.tokenizer import Tokenizer

_COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def json_schema_grammar(schema: dict[str, Any]) -> str:
    """The grammar of JSON documents valid against `schema`."""
    import llguidance

    try:  # compact separators: flexible whitespace lets a small model pad forever
        return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=_COMPACT)
    except (ValueError, TypeError) as e:
        raise InvalidRequestError(f"cannot use this JSON schema: {e}") from None


class GrammarCompiler:
    """Builds matchers over one tokenizer (building the token trie takes about a second, once)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: tuple[int, ...]) -> None:
        import llguidance

        self._ll = llguidance
        self._tokenizer = llguidance.LLTokenizer(tokenizer.to_json(), n_vocab=vocab_size,
                                                 eos_token=list(eos_token_ids) or None)
        self.vocab_size = vocab_size

    def matcher(self, grammar: str) -> Any:
        try:
            matcher = self._ll.LLMatcher(self._tokenizer, grammar)
        except (ValueError, TypeError) as e:
            raise InvalidRequestError(f"bad grammar: {e}") from None
        if matcher.is_error():
            raise InvalidRequestError(f"bad grammar: {matcher.get_error()}")
        return matcher


def mask_logits(row: torch.Tensor, matcher: Any) -> None:
    """Set the logits of tokens the grammar forbids next to -inf, in place (a CPU row)."""
    bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
    allowed = torch.from_numpy(bits[: row.shape[-1]].astype(bool))
    row.masked_fill_(~allowed, float("-inf"))
