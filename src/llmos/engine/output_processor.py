"""Output processing: token ids to text, stop conditions, and what a request shows so far.

The engine's output path, apart from scheduling and the model, as vLLM's
detokenizer and stop checker are. For each token a sequence appends it
detokenizes incrementally and decides whether the sequence stops and why.

Guarantees:
- text grows by whole characters only: a token that ends mid-character (a
  byte-level piece of a multi-byte character) adds nothing until the
  character is complete;
- a stop string never reaches the caller: the text is cut where the first
  stop string begins, and while a sequence runs, the last characters that
  could still begin one are held back;
- stop conditions in order of precedence: a stop token (the request's, or
  the model's end of sequence unless ignored), the grammar complete, a stop
  string, then length (max_tokens or the model's context).
"""

from __future__ import annotations

from llmos.engine.outputs import CompletionOutput
from llmos.engine.sequence import Sequence
from llmos.models.tokenizer import Tokenizer

StopReason = tuple[str, int | str | None]  # (finish_reason, stop_reason) as in CompletionOutput


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer | None, eos_token_ids: set[int], max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len

    def process_token(self, seq: Sequence, token: int) -> StopReason | None:
        """After `token` was appended to `seq` (and its grammar advanced): its new text, and why it
        stops now, or None when it goes on."""
        p = seq.params
        if p.detokenize and self.tokenizer is not None:
            self._detokenize(seq, self.tokenizer)
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids):
            return ("stop", token)
        if seq.matcher is not None and seq.matcher.is_stopped():
            return ("stop", None)  # the grammar is complete
        if (hit := _find_stop_string(seq)) is not None:
            return ("stop", hit)
        # max_tokens None: up to the model's context (the engine normally resolves it on admission)
        out_of_budget = p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens
        if out_of_budget or len(seq) >= self.max_model_len:
            return ("length", None)
        return None

    @staticmethod
    def _detokenize(seq: Sequence, tokenizer: Tokenizer) -> None:
        """Incremental detokenization; waits while the last token ends mid-character."""
        ids = seq.output_token_ids
        skip = seq.params.skip_special_tokens
        prefix = tokenizer.decode(ids[seq.prefix_offset : seq.read_offset], skip)
        full = tokenizer.decode(ids[seq.prefix_offset :], skip)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            seq.output_text += full[len(prefix) :]
            seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)


def _find_stop_string(seq: Sequence) -> str | None:
    """The stop string that now begins earliest in the text (which is cut there), or None.

    Only text not scanned before, plus the overlap a stop string could span, is searched."""
    stops = seq.params.stop
    if not stops:
        return None
    text = seq.output_text
    start = max(0, seq.stop_checked - max(len(s) for s in stops) + 1)
    seq.stop_checked = len(text)
    best: tuple[int, str] | None = None
    for s in stops:
        idx = text.find(s, start)
        if idx != -1 and (best is None or idx < best[0]):
            best = (idx, s)
    if best is None:
        return None
    seq.output_text = text[: best[0]]
    return best[1]


def completion_output(seq: Sequence) -> CompletionOutput:
    """What the caller sees of a sequence now: while it runs, the text less what may still turn
    out to begin a stop string."""
    text = seq.output_text
    holdback = max((len(s) for s in seq.params.stop), default=1) - 1
    if not seq.is_finished and holdback:
        text = text[: max(0, len(text) - holdback)]
    return CompletionOutput(seq.index, text, list(seq.output_token_ids), seq.finish_reason, seq.stop_reason,
                            list(seq.output_logprobs) if seq.params.logprobs is not None else None)
