"""Grammar-constrained decoding: a per-request token mask applied before sampling.

A request with a grammar (JSON schema, regex or Lark, compiled by llguidance)
gets a matcher that says which tokens may come next; disallowed tokens get
-inf logits, so the output parses by construction. Requests without a grammar
pay nothing: the sampler only looks for matchers on the sequences that have one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
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


def _allowed(mask: bytes, token: int) -> bool:
    return bool(mask[token >> 3] >> (token & 7) & 1)


_CHEAP = [f"{space}{value}" for value in ("0", "1", "false", "true", "null", '""', "[]", "{}", "[", "{", '"')
          for space in (" ", "")] + ["a", ",", ":", " "]


def _scan(text: str, state: tuple[bool, bool, str] = (False, False, "")) -> tuple[bool, bool, str]:
    """JSON lexical state after `text` follows `state`: (inside a string, after a backslash,
    the last character outside strings that was not a space)."""
    inside, escaped, last = state
    for ch in text:
        if escaped:
            escaped = False
        elif inside:
            escaped = ch == "\\"
            if ch == '"':
                inside, last = False, '"'
        elif ch == '"':
            inside = True
        elif not ch.isspace():
            last = ch
    return inside, escaped, last


class BudgetGuard:
    """Makes a constrained reply finish within its token budget.

    `plan` is a short way the grammar can be completed from a matcher's state:
    forced tokens; at each choice, inside a string its closing quote (with
    closing brackets), outside one closing brackets, else the cheapest value
    (0, false, "", ...), else the longest token allowed; then the end of text.
    The engine re-plans as the budget runs down; near the end it takes a
    sampled token only if a plan still fits after it, and once the plan needs
    all the tokens left it emits the plan instead of sampling, so the JSON
    closes and parses before `max_tokens` (whenever a plan fit at the start).
    """

    MARGIN = 2  # tokens kept in hand: the plan may grow by this much between two checks
    NEAR = 8  # within this many tokens of the plan, every sampled token is checked before it is taken
    HORIZON = 64  # budgets further than this from their end are not checked

    def __init__(self, tokenizer: Tokenizer, eos_token_ids: tuple[int, ...]) -> None:
        self._text = [tokenizer.decode([t], skip_special_tokens=False) for t in range(tokenizer.vocab_size)]
        vocab = {text: t for t, text in enumerate(self._text)}
        by_length = sorted(vocab, key=len, reverse=True)
        self._close_string = [vocab[t] for t in by_length if t[:1] == '"' and set(t[1:]) <= set("}]")]
        self._close = [vocab[t] for t in by_length if t and set(t) <= set("}]")]
        self._after_value = [*self._close, vocab[","]]
        self._close += [vocab[t] for t in _CHEAP if t in vocab]
        self._eos = list(eos_token_ids)
        self._lengths = np.array([len(t.encode()) for t in self._text])

    def plan(self, matcher: Any, text: str, limit: int, after: int | None = None) -> list[int] | None:
        """Tokens that complete the grammar from `matcher`'s state (left untouched), given the `text`
        generated so far (and then token `after`); None when none is found within `limit` tokens."""
        m = matcher.deep_copy()
        if after is not None:
            if not m.consume_token(after):
                return None
            text += self._text[after]
        state = _scan(text)
        path: list[int] = []
        while len(path) <= limit:
            if m.is_stopped():
                return path
            forced = m.compute_ff_tokens()
            if not forced:
                mask = m.compute_bitmask()
                eos = next((t for t in self._eos if _allowed(mask, t)), None)
                if eos is not None:
                    return path + [eos]
                if state[0]:
                    prefs = self._close_string
                elif state[2].isalnum() or state[2] in '"}]':
                    prefs = self._after_value
                else:
                    prefs = self._close
                token = next((t for t in prefs if _allowed(mask, t)), None)
                if token is None:  # the longest token allowed: forced text in the fewest tokens
                    bits = np.unpackbits(np.frombuffer(mask, dtype=np.uint8), bitorder="little")
                    allowed = np.flatnonzero(bits[: len(self._lengths)])
                    if not len(allowed):
                        return None
                    token = int(allowed[np.argmax(self._lengths[allowed])])
                forced = [token]
            if not m.consume_tokens(forced):
                return None
            path += forced
            for t in forced:
                state = _scan(self._text[t], state)
        return None


@dataclass
class Closing:
    """A constrained sequence's budget state (see BudgetGuard)."""

    plan: list[int] | None = None  # the latest plan, from the state before this step's token
    planned_at: int = -1  # the step it was made in
    check_at: int = 0  # the step to plan again at
    committed: list[int] | None = None  # the rest of the plan being emitted
