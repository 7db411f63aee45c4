"""POST /v1/embeddings: the sentence-embedding model archival memory uses, in OpenAI's shape.

One model serves both (memory/embeddings.py, all-MiniLM-L6-v2, 384
dimensions), so a vector a client gets here is the vector archival memory
stores for the same text. Inputs are encoded as one batch, off the event
loop; vectors are unit length, as float lists or base64 float32.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any

from fastapi import APIRouter

from llmos.server.messages import MessageError, check_unicode
from llmos.server.protocol import MAX_PROMPTS, EmbeddingRequest

EMBEDDING_MODEL = "all-MiniLM-L6-v2"
_ALIASES = (EMBEDDING_MODEL, f"sentence-transformers/{EMBEDDING_MODEL}")


def router(embedder: Any = None) -> APIRouter:
    """The embeddings route over `embedder` (default: memory's one MiniLM embedder, loaded on first use)."""
    from llmos.server.app import APIError

    api = APIRouter()

    def model() -> Any:
        nonlocal embedder
        if embedder is None:
            from llmos.memory.embeddings import default_embedder

            embedder = default_embedder()
        return embedder

    @api.post("/v1/embeddings")
    async def embeddings(req: EmbeddingRequest) -> dict[str, Any]:
        if req.model is not None and req.model not in _ALIASES:
            raise APIError(404, f"embedding model {req.model!r} does not exist; this server embeds with "
                           f"{EMBEDDING_MODEL!r}", param="model", code="model_not_found")
        texts = [req.input] if isinstance(req.input, str) else req.input
        if not texts or not all(isinstance(t, str) for t in texts):
            raise APIError(400, "input must be a non-empty string or list of strings (token ids are not "
                           "accepted: the embedding model has its own tokenizer)", param="input")
        if len(texts) > MAX_PROMPTS:
            raise APIError(400, f"input holds at most {MAX_PROMPTS} texts, got {len(texts)}", param="input")
        if any(not t for t in texts):
            raise APIError(400, "input texts must not be empty", param="input")
        try:
            check_unicode(texts, "input")
        except MessageError as e:
            raise APIError(400, str(e), param="input") from None
        m = model()
        if req.dimensions is not None and req.dimensions != m.dim:
            raise APIError(400, f"{EMBEDDING_MODEL} has {m.dim} dimensions; dimensions={req.dimensions} "
                           "is not supported", param="dimensions")
        vectors = await asyncio.to_thread(m.encode, texts)
        tokens = await asyncio.to_thread(m.count_tokens, texts)
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode()
                 if req.encoding_format == "base64" else v.tolist()} for i, v in enumerate(vectors)]
        return {"object": "list", "data": data, "model": EMBEDDING_MODEL,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    return api
