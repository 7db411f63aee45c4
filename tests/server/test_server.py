"""The OpenAI-compatible server, driven over HTTP by the official openai client."""

import json
import threading
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

import llmos
from tests.server.conftest import MODEL, start_server

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
COLORS = [{"role": "user", "content": "Name three colors."}]


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def used_blocks(server) -> int:
    return server.llm.engine.blocks.num_used_blocks


def wait_for_no_used_blocks(server, timeout: float = 10) -> int:
    deadline = time.monotonic() + timeout
    while used_blocks(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    return used_blocks(server)


def test_models(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL, "all-MiniLM-L6-v2"]
    card = client.models.retrieve(MODEL)
    assert card.id == MODEL and card.model_extra["max_model_len"] == server.llm.engine.max_model_len
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    assert httpx.get(f"{server.url}/version").json() == {"version": llmos.__version__}


def test_chat_answer_and_usage(client, server):
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=40)
    assert r.choices[0].message.content == "The capital of France is Paris."
    assert r.choices[0].finish_reason == "stop"
    prompt_ids = server.llm.tokenizer.encode_chat(QUESTION)
    assert r.usage.prompt_tokens == len(prompt_ids)
    tokens = httpx.post(f"{server.url}/tokenize", json={"messages": QUESTION}).json()
    assert tokens["count"] == len(prompt_ids)
    answer_ids = server.llm.tokenizer.encode(r.choices[0].message.content, add_special_tokens=False)
    assert r.usage.completion_tokens == len(answer_ids) + 1  # and the <|im_end|> that stopped it
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_matches_and_reports_usage(client):
    stream = client.chat.completions.create(model=MODEL, messages=COLORS, temperature=0, max_tokens=30,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "1. Red\n2. Blue\n3. Green"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens > 0 and not chunks[-1].choices


def test_completion_n_seed_stop_and_stream(client):
    kw = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 12, "temperature": 0.9, "seed": 5}
    a = client.completions.create(n=2, **kw)
    b = client.completions.create(n=2, **kw)
    assert len(a.choices) == 2 and [c.index for c in a.choices] == [0, 1]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    greedy = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=10, temperature=0)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="1, 2, 3, 4,", max_tokens=10, temperature=0, stream=True))
    assert streamed == greedy.choices[0].text
    stop = greedy.choices[0].text.strip()[:2]
    cut = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=10, temperature=0,
                                    stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and stop not in cut.choices[0].text


def test_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=COLORS, temperature=0, max_tokens=5,
                                       logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) >= 2
        assert entry.logprob == max(t.logprob for t in entry.top_logprobs)
    c = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=4, temperature=0, logprobs=3)
    assert len(c.choices[0].logprobs.tokens) == 4 and len(c.choices[0].logprobs.top_logprobs[0]) >= 3


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"model": "no-such-model", "messages": QUESTION}, 404, "model"),
    ({"messages": QUESTION, "temperature": -1}, 400, None),
    ({"messages": QUESTION, "top_p": 0}, 400, None),
    ({"messages": QUESTION, "n": 0}, 400, None),
    ({"messages": []}, 400, "messages"),
    ({"messages": QUESTION, "max_tokens": 100000}, 400, None),
    ({"messages": "hello"}, 400, "messages"),
])
def test_errors_have_openai_shape(server, body, status, param):
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body)
    assert r.status_code == status
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    assert wait_for_no_used_blocks(server) == 0


def test_openai_client_raises_on_bad_request(client):
    with pytest.raises(openai.BadRequestError, match="temperature must be >= 0"):
        client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=-1)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=QUESTION)


def test_api_key_is_enforced(llm):
    srv, thread, url = start_server(llm, api_key="sekret")
    try:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        ok = openai.OpenAI(base_url=f"{url}/v1", api_key="sekret", max_retries=0)
        assert ok.models.list().data[0].id == MODEL
        assert httpx.get(f"{url}/health").status_code == 200
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


def test_disconnect_frees_blocks(server):
    body = {"model": MODEL, "prompt": "Count: 1, 2, 3,", "max_tokens": 400, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"]:
                assert used_blocks(server) > 0
                break
    assert wait_for_no_used_blocks(server) == 0


def test_concurrent_streams_and_metrics(server, client):
    def scrape() -> dict[str, float]:
        text = httpx.get(f"{server.url}/metrics").text
        return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}

    before = scrape()
    texts: list[str] = [""] * 32

    def run(i: int) -> None:
        stream = client.completions.create(model=MODEL, prompt=f"Story {i}:", max_tokens=8, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True})
        texts[i] = "".join(c.choices[0].text for c in stream)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert all(texts)
    assert wait_for_no_used_blocks(server) == 0
    after = scrape()
    assert after["llmos_requests_finished_total"] >= before["llmos_requests_finished_total"] + 32
    assert after["llmos_generation_tokens_total"] >= before["llmos_generation_tokens_total"] + 32 * 8
    assert after["llmos_num_running"] == 0
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds"):
        for prefix in ("llmos_", "vllm:"):  # histograms under vLLM's names too, for its dashboards
            count = f"{prefix}{name}_count"
            assert after[count] >= before.get(count, 0) + 32
            assert after[f"{prefix}{name}_bucket"] == after[count]  # the last bucket, +Inf, holds all
    itl = "vllm:inter_token_latency_seconds_count"
    assert after[itl] >= before.get(itl, 0) + 32 * 7  # 8 tokens: 7 gaps each
    assert 0 < after["vllm:e2e_request_latency_seconds_sum"]


def test_completion_of_several_prompts_and_token_ids(client, server):
    ids = server.llm.tokenizer.encode("1, 2, 3, 4,")
    r = client.completions.create(model=MODEL, prompt=["1, 2, 3, 4,", "The sky is"], max_tokens=6,
                                  temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == r.choices[0].text
    assert r.usage.prompt_tokens == len(ids) + len(server.llm.tokenizer.encode("The sky is"))
    with pytest.raises(openai.BadRequestError, match="outside the vocabulary"):
        client.completions.create(model=MODEL, prompt=[[100, 200], [10**7]], max_tokens=4)
    assert wait_for_no_used_blocks(server) == 0
