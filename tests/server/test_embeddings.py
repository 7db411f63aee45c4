"""POST /v1/embeddings with the official client: the model archival memory uses, in OpenAI's shape."""

import base64

import numpy as np
import openai
import pytest

from llmos.memory.embeddings import default_embedder

TEXTS = ["The cat sat on the mat.", "A kitten was sitting on the rug.",
         "Quarterly tax filings are due in April."]


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_embeddings_match_the_model_and_rank_meaning(client):
    r = client.embeddings.create(model="all-MiniLM-L6-v2", input=TEXTS)
    assert [d.index for d in r.data] == [0, 1, 2] and r.model == "all-MiniLM-L6-v2"
    vectors = np.array([d.embedding for d in r.data])
    assert vectors.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    direct = default_embedder().encode(TEXTS)  # the model, run directly
    np.testing.assert_allclose(vectors, direct, atol=1e-5)
    related, unrelated = vectors[0] @ vectors[1], vectors[0] @ vectors[2]
    assert related > unrelated + 0.3
    assert r.usage.prompt_tokens == r.usage.total_tokens == default_embedder().count_tokens(TEXTS)


def test_single_string_base64_and_unknown_model(client):
    one = client.embeddings.create(model="all-MiniLM-L6-v2", input=TEXTS[0])
    raw = client.embeddings.with_raw_response.create(model="all-MiniLM-L6-v2", input=TEXTS[0],
                                                     encoding_format="base64").http_response.json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(decoded, one.data[0].embedding, atol=1e-6)
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="text-embedding-3-small", input="hi")
    with pytest.raises(openai.BadRequestError, match="384 dimensions"):
        client.embeddings.create(model="all-MiniLM-L6-v2", input="hi", dimensions=128)
