"""The tokenizer llmos builds from GGUF metadata, against transformers' tokenizer for the same file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from reference_models import byte_level_vocab

from llmos.models.gguf_file import read_gguf_file
from llmos.models.loader import LoadedModel
from llmos.models.tokenizer import Tokenizer

TEXTS = [
    "Hello world",
    "1234567 + 89 = 1234656; 3.14159e-10",
    "  leading, inner   runs\tand\n\n\ntrailing whitespace  ",
    "\r\n\r\nwindows line ends\r\n",
    "héllo wörld — ünïcödé Ελληνικά русский 日本語 한국어 🤖👩‍💻",
    "def f(x):\n    return {'a': x ** 2}  # comment\n\tif x != 0: pass\n",
    "I'm sure you're right, they'll see; WE'VE won't",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "a<|im_end|>b<|endoftext|>c <|im_start|> d",
    "<|im_start|<|im_end|",  # broken specials are plain text
    "<repo_name>x<file_sep>y<filename>z.py",
    "https://example.com/path?q=1&r=2#frag",
    "",
    " ",
    "\x00\x01 control \x7f bytes",
]
SMOLLM_CHAT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    "<|im_start|>assistant\n4<|im_end|>\n"
    "<|im_start|>assistant\n"
)
CHAT = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]


@pytest.fixture(scope="module")
def hf_tokenizer(smollm_path: Path) -> Any:
    """transformers' conversion of the GGUF vocabulary (about 10 s)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm_path.parent), gguf_file=smollm_path.name)


@pytest.fixture(scope="module")
def tok(smollm_path: Path) -> Tokenizer:
    return Tokenizer.from_gguf_fields(read_gguf_file(smollm_path).fields)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(tok: Tokenizer, hf_tokenizer: Any, text: str) -> None:
    assert tok.encode(text) == hf_tokenizer.encode(text)
    assert tok.encode(text, add_special_tokens=False) == hf_tokenizer.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("text", TEXTS)
def test_decode_round_trips(tok: Tokenizer, hf_tokenizer: Any, text: str) -> None:
    ids = tok.encode(text)
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.decode(ids, skip_special_tokens=True) == hf_tokenizer.decode(ids, skip_special_tokens=True)


def test_special_tokens_are_single_ids(tok: Tokenizer) -> None:
    assert tok.encode("<|endoftext|><|im_start|><|im_end|>") == [0, 1, 2]
    assert (tok.bos_token, tok.bos_token_id) == ("<|im_start|>", 1)
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 2)
    assert not tok.add_bos
    assert tok.vocab_size == 49152
    assert tok.decode([1, 4093, 2], skip_special_tokens=True) == "user"


def test_digits_split_one_by_one(tok: Tokenizer) -> None:
    """SmolLM2's pre-tokenizer isolates every digit (its tokenizer.json has Digits(individual))."""
    ids = tok.encode("2024")
    assert [tok.id_to_token(i) for i in ids] == ["2", "0", "2", "4"]


def test_chat_template_renders_expected_string(tok: Tokenizer, hf_tokenizer: Any) -> None:
    rendered = tok.apply_chat_template(CHAT)
    assert rendered == SMOLLM_CHAT
    assert rendered == hf_tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template(CHAT, add_generation_prompt=False) == SMOLLM_CHAT.removesuffix(
        "<|im_start|>assistant\n"
    )


def test_encode_chat_matches_transformers(tok: Tokenizer, hf_tokenizer: Any) -> None:
    theirs = hf_tokenizer.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True)
    theirs = theirs["input_ids"] if isinstance(theirs, dict) or hasattr(theirs, "keys") else theirs
    assert tok.encode_chat(CHAT) == list(theirs)


def test_loaded_model_carries_the_gguf_tokenizer(smollm: LoadedModel, tok: Tokenizer) -> None:
    assert smollm.tokenizer.encode(TEXTS[4]) == tok.encode(TEXTS[4])
    assert smollm.tokenizer.chat_template == tok.chat_template


def test_save_pretrained_round_trips(tok: Tokenizer, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    again = Tokenizer.from_hf_dir(tmp_path)
    theirs = AutoTokenizer.from_pretrained(str(tmp_path))
    for text in TEXTS:
        assert again.encode(text) == tok.encode(text) == theirs.encode(text)
    assert again.apply_chat_template(CHAT) == SMOLLM_CHAT
    assert (again.bos_token_id, again.eos_token_id, again.add_bos) == (1, 2, False)


def _tiny_tokenizer_dir(path: Path, *, add_bos: bool) -> Path:
    """A tokenizer.json whose post-processor prepends BOS, like Llama 3's."""
    from tokenizers import processors

    tokens, types, merges = byte_level_vocab()
    fields = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens,
              "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges,
              "tokenizer.ggml.bos_token_id": tokens.index("<|im_start|>"),
              "tokenizer.ggml.eos_token_id": tokens.index("<|im_end|>")}
    tok = Tokenizer.from_gguf_fields(fields)
    bos = tok.bos_token_id
    tok._tok.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", bos)]
    )
    tok.add_bos = add_bos
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("add_bos", [False, True])
def test_hf_dir_post_processor_bos_matches_transformers(tmp_path: Path, add_bos: bool) -> None:
    """A tokenizer.json post-processor adds BOS exactly once, as transformers does."""
    from transformers import AutoTokenizer

    path = _tiny_tokenizer_dir(tmp_path, add_bos=add_bos)
    ours, theirs = Tokenizer.from_hf_dir(path), AutoTokenizer.from_pretrained(str(path))
    for text in ("the cat", "", "<|im_start|>x"):
        assert ours.encode(text) == theirs.encode(text)
        assert ours.encode(text, add_special_tokens=False) == theirs.encode(text, add_special_tokens=False)
    assert ours.encode("the")[0] == ours.bos_token_id
    assert ours.encode("the").count(ours.bos_token_id) == 1
