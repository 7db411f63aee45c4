"""One request never fails another, and a client that leaves (streamed or not, before or after its
first token) frees its sequence at once; the sampling parameters that reach the engine work."""

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import httpx
import openai
import pytest

from tests.server.conftest import MODEL

PROMPTS = ["The capital of France is", "One, two, three,", "My favourite colour is"]


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def complete(client, prompt: str, **kw) -> str:
    return client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, **kw).choices[0].text


def test_poisoned_requests_beside_valid_ones(client, server):
    alone = [complete(client, p, temperature=0) for p in PROMPTS]
    raw = b'{"model": "%s", "prompt": "x", "max_tokens": 8, "temperature": %s}'

    def poison(value: bytes) -> int:
        return httpx.post(f"{server.url}/v1/completions", content=raw % (MODEL.encode(), value),
                          headers={"content-type": "application/json"}, timeout=120).status_code

    with ThreadPoolExecutor(8) as pool:
        valid = [pool.submit(complete, client, p, temperature=0) for p in PROMPTS]
        tiny = pool.submit(complete, client, PROMPTS[0], temperature=1e-45)  # overflowed the logits once
        bad = [pool.submit(poison, v) for v in (b"Infinity", b"NaN", b"-1", b"1e400")]
        assert [f.result() for f in valid] == alone
        assert tiny.result() == alone[0]  # a tiny temperature is greedy
        assert [f.result() for f in bad] == [400] * 4


def wait_until_idle(server, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while server.llm.engine.requests and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not server.llm.engine.requests and server.llm.engine.blocks.num_used_blocks == 0


def test_non_streamed_client_that_leaves_is_aborted(server):
    engine = server.llm.engine
    before = engine.metrics.generation_tokens
    body = {"model": MODEL, "prompt": "Count: 1, 2, 3,", "max_tokens": 2000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.5))
    wait_until_idle(server)
    assert engine.metrics.generation_tokens - before < 1000  # stopped long before its 2000 tokens


def test_stream_closed_before_its_first_token_is_aborted(server):
    """The client sends a long prompt and hangs up at once: the prefill never reaches a token."""
    engine = server.llm.engine
    before_tokens, before_prompts = engine.metrics.generation_tokens, engine.metrics.prompt_tokens
    body = json.dumps({"model": MODEL, "prompt": [7] * 1000, "max_tokens": 1000, "stream": True,
                       "ignore_eos": True}).encode()
    url = urlparse(server.url)
    with socket.create_connection((url.hostname, url.port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 20
        while engine.metrics.prompt_tokens == before_prompts and time.monotonic() < deadline:
            time.sleep(0.005)  # until the request is in the engine
    wait_until_idle(server)
    assert engine.metrics.generation_tokens - before_tokens < 500  # stopped long before its 1000 tokens


def test_disconnect_of_a_multi_prompt_stream_aborts_every_prompt(server):
    body = {"model": MODEL, "prompt": ["Count: 1, 2,", "Count: a, b,"], "max_tokens": 300,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"]:
                break
    wait_until_idle(server)


def test_echo_penalties_bias_and_min_p(client, server):
    tok = server.llm.tokenizer
    greedy = client.completions.create(model=MODEL, prompt="1, 1, 1, 1,", max_tokens=6, temperature=0)
    echoed = client.completions.create(model=MODEL, prompt="1, 1, 1, 1,", max_tokens=6, temperature=0,
                                       echo=True)
    assert echoed.choices[0].text == "1, 1, 1, 1," + greedy.choices[0].text
    stream = client.completions.create(model=MODEL, prompt="1, 1, 1, 1,", max_tokens=6, temperature=0,
                                       echo=True, stream=True)
    assert "".join(c.choices[0].text for c in stream) == echoed.choices[0].text
    penalised = complete(client, "1, 1, 1, 1,", temperature=0, frequency_penalty=2.0, presence_penalty=2.0,
                         extra_body={"repetition_penalty": 1.5})
    assert "1" not in penalised[:2] and penalised != greedy.choices[0].text[:len(penalised)]
    token = tok.encode(" banana", add_special_tokens=False)[0]
    biased = complete(client, "1, 1, 1, 1,", temperature=0, logit_bias={str(token): 100})
    assert biased == tok.decode([token] * 8)
    kept = {complete(client, "The capital of France is", temperature=1.0, seed=s,
                     extra_body={"min_p": 1.0}) for s in range(3)}
    assert kept == {complete(client, "The capital of France is", temperature=0)}  # min_p 1: top token only
