from tests.memory.conftest import count_tokens, embedder, tokenizer  # noqa: F401  (shared fixtures)
