"""Output processing on the embedded model's real tokenizer: whole characters only, stop strings
cut and held back, stop conditions in their order of precedence."""

from __future__ import annotations

import pytest

from llmos.engine.output_processor import OutputProcessor, completion_output
from llmos.engine.sampling_params import SamplingParams
from llmos.engine.sequence import Sequence, SequenceStatus

EOS = 2


@pytest.fixture(scope="module")
def tok(smollm):
    return smollm.tokenizer


def _run(proc: OutputProcessor, tokens: list[int], **params) -> tuple[Sequence, list, list[str], list[str]]:
    """Append `tokens` one by one as the engine does: each step's stop reason, visible text and
    whole text."""
    seq = Sequence("r", 0, [1, 2, 3], 3, SamplingParams(**{"max_tokens": 100, **params}))
    seq.status = SequenceStatus.RUNNING
    reasons, shown, texts = [], [], []
    for t in tokens:
        seq.token_ids.append(t)
        reason = proc.process_token(seq, t)
        reasons.append(reason)
        if reason is not None:
            seq.finish_reason, seq.stop_reason = reason
            seq.status = SequenceStatus.FINISHED
        shown.append(completion_output(seq).text)
        texts.append(seq.output_text)
        if reason is not None:
            break
    return seq, reasons, shown, texts


def test_a_character_split_over_tokens_appears_whole(tok):
    ids = tok.encode("ok 🦙!", add_special_tokens=False)
    llama = [i for i in ids if "\ufffd" in tok.decode([i], False)]
    assert len(llama) >= 2, "the emoji is more than one byte-level token"
    seq, reasons, shown, _ = _run(OutputProcessor(tok, {EOS}, 4096), ids)
    assert reasons == [None] * len(ids)
    assert all("\ufffd" not in s for s in shown)
    assert seq.output_text == "ok 🦙!"
    first, last = ids.index(llama[0]), ids.index(llama[-1])
    assert shown[first] == shown[last - 1] == "ok"  # nothing of " 🦙" until its last byte
    assert shown[last] == "ok 🦙"


def test_a_stop_string_is_cut_and_never_shown(tok):
    ids = tok.encode("the red fox jumps over", add_special_tokens=False)
    seq, reasons, shown, texts = _run(OutputProcessor(tok, {EOS}, 4096), ids, stop=["fox j"])
    assert reasons[-1] == ("stop", "fox j") and all(r is None for r in reasons[:-1])
    assert seq.output_text == "the red " == shown[-1]
    assert all("fox j" not in s and len(s) <= len(seq.output_text) for s in shown)
    # while running, the last len("fox j") - 1 characters wait: they may begin the stop string
    assert [s for s in shown[:-1]] == [t[: max(0, len(t) - 4)] for t in texts[:-1]]
    assert texts[-2] == "the red fox"  # the text that was held back: " fox" might have begun it


def test_stop_conditions_in_order(tok):
    proc = OutputProcessor(tok, {EOS}, max_model_len=3 + 4)
    word = tok.encode(" hello", add_special_tokens=False)[0]
    # a request stop token beats length on the same token
    assert _run(proc, [word, 77], stop_token_ids=[77], max_tokens=2)[1][-1] == ("stop", 77)
    # end of sequence stops, unless ignored; then max_tokens
    assert _run(proc, [word, EOS])[1][-1] == ("stop", EOS)
    assert _run(proc, [word, EOS, word], ignore_eos=True, max_tokens=3)[1] == [None, None, ("length", None)]
    # the model's context ends a sequence whose max_tokens is larger
    assert _run(proc, [word] * 5)[1] == [None, None, None, ("length", None)]


def test_no_text_without_detokenize(tok):
    seq, reasons, shown, _ = _run(OutputProcessor(tok, {EOS}, 4096), tok.encode("abc def", False),
                                  detokenize=False)
    assert seq.output_text == "" and shown[-1] == "" and reasons[-1] is None
