"""An OpenAI-compatible HTTP API over the engine (FastAPI), so existing clients work unchanged.

Errors come in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`,
with 400 for bad parameters, 401 for a wrong API key, 404 for an unknown model
and 503 while the engine is down. A client that leaves a stream aborts its
request, which frees its KV blocks at once.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from llmos.engine import AsyncLLM, InvalidRequestError, RequestOutput, SamplingParams
from llmos.engine.async_engine import EngineDeadError
from llmos.engine.guided import json_schema_grammar
from llmos.models.config import ModelError
from llmos.server import guidance, metrics
from llmos.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def _error(status: int, message: str, type_: str, param: str | None = None,
           code: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


def create_app(llm: AsyncLLM, model_name: str, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="llmos", version="0.1.0")
    tokenizer = llm.tokenizer
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return _error(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return _error(400, f"{param or 'body'}: {first.get('msg', 'invalid request')}",
                      "invalid_request_error", param)

    @app.exception_handler(InvalidRequestError)
    async def _invalid(_: Request, e: InvalidRequestError) -> JSONResponse:
        return _error(400, str(e), "invalid_request_error")

    @app.exception_handler(ModelError)
    async def _model(_: Request, e: ModelError) -> JSONResponse:
        return _error(400, str(e), "invalid_request_error")

    @app.exception_handler(EngineDeadError)
    async def _dead(_: Request, e: EngineDeadError) -> JSONResponse:
        return _error(503, str(e), "service_unavailable")

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path not in ("/health", "/metrics"):
            if request.headers.get("authorization") != f"Bearer {api_key}":
                return _error(401, "invalid API key", "authentication_error", code="invalid_api_key")
        return await call_next(request)

    def check_model(name: str | None) -> None:
        if name and name != model_name:
            raise APIError(404, f"model {name!r} does not exist; this server runs {model_name!r}",
                           param="model", code="model_not_found")

    @app.get("/health")
    async def health() -> Response:
        if llm.is_dead:
            raise EngineDeadError("the engine is not running")
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": model_name, "object": "model", "created": created, "owned_by": "llmos",
             "max_model_len": llm.engine.max_model_len}]}

    @app.get("/metrics")
    async def prometheus() -> Response:
        body, content_type = metrics.render(await llm.stats())
        return Response(body, media_type=content_type)

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> dict[str, Any]:
        check_model(req.model)
        if req.messages is not None:
            ids = tokenizer.encode_chat(req.messages)
        elif req.prompt is not None:
            ids = tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        else:
            raise APIError(400, "give a prompt or messages", param="prompt")
        return {"tokens": ids, "count": len(ids), "max_model_len": llm.engine.max_model_len}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> dict[str, Any]:
        check_model(req.model)
        vocab = llm.engine.model_config.vocab_size
        if any(not 0 <= t < vocab for t in req.tokens):
            raise APIError(400, f"token ids must be in [0, {vocab})", param="tokens")
        return {"prompt": tokenizer.decode(req.tokens)}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        check_model(req.model)
        prompts = _prompts(req.prompt)
        params = _params(req, req.max_tokens if req.max_tokens is not None else 16, req.logprobs)
        return await _respond(llm, req, prompts, params, "text_completion", model_name)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest):
        check_model(req.model)
        if not req.messages:
            raise APIError(400, "messages must not be empty", param="messages")
        try:
            schema, tool_mode = guidance.constraint(req)
        except guidance.GuidanceError as e:
            raise APIError(400, str(e), param="tools" if req.tools else "response_format") from None
        messages = req.messages
        if tool_mode and "tools" not in (tokenizer.chat_template or ""):
            messages = [guidance.tools_prompt(req.tools), *messages]
        try:
            ids = tokenizer.encode_chat(messages, tools=req.tools)
        except (ModelError, TypeError, KeyError) as e:
            raise APIError(400, f"messages do not fit the chat template: {e}", param="messages") from None
        limit = req.max_completion_tokens or req.max_tokens
        top = (req.top_logprobs or 0) if req.logprobs else None
        params = _params(req, limit, top)
        params.grammar = json_schema_grammar(schema) if schema is not None else None
        tools = req.tools if tool_mode else None
        return await _respond(llm, req, [ids], params, "chat.completion", model_name, tools)

    return app


def _prompts(prompt: str | list[int] | list[str] | list[list[int]]) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError(400, "prompt is empty", param="prompt")
    if all(isinstance(t, int) for t in prompt):
        return [prompt]
    return list(prompt)


def _params(req, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    return SamplingParams(n=req.n, max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                          top_k=req.top_k, seed=req.seed, stop=stop, stop_token_ids=req.stop_token_ids or [],
                          ignore_eos=req.ignore_eos, logprobs=logprobs)


async def _respond(llm: AsyncLLM, req, prompts, params: SamplingParams, kind: str,
                   model_name: str, tools: list[dict[str, Any]] | None = None):
    rid = f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex}"
    streams = [llm.generate(p, params, f"{rid}-{i}") for i, p in enumerate(prompts)]
    shape = _Shape(llm, kind, rid, model_name, params.n, tools)
    if req.stream:
        return StreamingResponse(_sse(shape, streams, req.include_usage), media_type="text/event-stream")
    tasks = [asyncio.ensure_future(_last(s)) for s in streams]
    try:
        finals: list[RequestOutput] = await asyncio.gather(*tasks)
    finally:  # one prompt failed, or the client left: abort the rest
        for t in tasks:
            t.cancel()
    return shape.full(finals)


async def _last(stream: AsyncIterator[RequestOutput]) -> RequestOutput:
    last = None
    async for out in stream:
        last = out
    return last


async def _merge(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several request streams; closing this closes (aborts) all of them."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in stream:
                await queue.put((i, out))
        except Exception as e:  # handed to the consumer
            await queue.put((i, e))
        await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        done = 0
        while done < len(tasks):
            i, item = await queue.get()
            if item is None:
                done += 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _sse(shape: _Shape, streams, include_usage: bool) -> AsyncIterator[str]:
    try:
        if shape.chat:
            for c in range(shape.n * len(streams)):
                yield _event(shape.chunk([{"index": c, "delta": {"role": "assistant", "content": ""},
                                           "logprobs": None, "finish_reason": None}]))
        finals: dict[int, RequestOutput] = {}
        async for i, out in _merge(streams):
            choices = shape.deltas(i, out)
            if choices:
                yield _event(shape.chunk(choices))
            if out.finished:
                finals[i] = out
        if include_usage:
            yield _event({**shape.chunk([]), "usage": shape.usage([finals[i] for i in sorted(finals)])})
        yield "data: [DONE]\n\n"
    except (InvalidRequestError, EngineDeadError) as e:
        yield _event({"error": {"message": str(e), "type": "invalid_request_error", "param": None,
                                "code": None}})


def _event(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


class _Shape:
    """Builds OpenAI response bodies (full and streamed) from engine outputs."""

    def __init__(self, llm: AsyncLLM, kind: str, rid: str, model: str, n: int,
                 tools: list[dict[str, Any]] | None = None) -> None:
        self.tok, self.kind, self.rid, self.model, self.n = llm.tokenizer, kind, rid, model, n
        self.tools = tools  # replies may be tool calls: they are sent whole, when finished
        self.chat = kind == "chat.completion"
        self.created = int(time.time())
        self.sent_text: dict[int, int] = {}
        self.sent_tokens: dict[int, int] = {}

    def _token(self, token_id: int) -> str:
        return self.tok.decode([token_id], skip_special_tokens=False)

    def _logprobs(self, entries: list[dict[int, float]], token_ids: list[int], offset: int):
        if self.chat:
            content = []
            for entry, t in zip(entries, token_ids, strict=True):
                top = [{"token": self._token(k), "logprob": v,
                        "bytes": list(self._token(k).encode())} for k, v in entry.items() if k != t]
                s = self._token(t)
                content.append({"token": s, "logprob": entry[t], "bytes": list(s.encode()),
                                "top_logprobs": [{"token": s, "logprob": entry[t],
                                                  "bytes": list(s.encode())}, *top]})
            return {"content": content}
        tokens = [self._token(t) for t in token_ids]
        offsets, pos = [], offset
        for s in tokens:
            offsets.append(pos)
            pos += len(s)
        return {"tokens": tokens, "token_logprobs": [e[t] for e, t in zip(entries, token_ids, strict=True)],
                "top_logprobs": [{self._token(k): v for k, v in e.items()} for e in entries],
                "text_offset": offsets}

    def _choice(self, index: int, text: str, finish: str | None, logprobs) -> dict[str, Any]:
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            calls = guidance.tool_calls(text, self.tools) if self.tools else None
            if calls:
                message, finish = {"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls"
            return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish}
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}

    def usage(self, finals: list[RequestOutput]) -> dict[str, int]:
        prompt = sum(len(f.prompt_token_ids) for f in finals)
        completion = sum(len(c.token_ids) for f in finals for c in f.outputs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def full(self, finals: list[RequestOutput]) -> dict[str, Any]:
        choices = []
        for i, final in enumerate(finals):
            for c in final.outputs:
                lp = (self._logprobs(c.logprobs, c.token_ids, 0) if c.logprobs is not None else None)
                choices.append(self._choice(i * self.n + c.index, c.text, _finish(c.finish_reason), lp))
        return {"id": self.rid, "object": self.kind, "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage(finals)}

    def chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.rid, "object": kind, "created": self.created, "model": self.model,
                "choices": choices}

    def deltas(self, prompt_index: int, out: RequestOutput) -> list[dict[str, Any]]:
        choices = []
        for c in out.outputs:
            index = prompt_index * self.n + c.index
            sent, sent_tok = self.sent_text.get(index, 0), self.sent_tokens.get(index, 0)
            text = c.text[sent:]
            new_ids = c.token_ids[sent_tok:]
            if (not text or self.tools) and not c.finished:
                continue
            self.sent_text[index] = len(c.text)
            self.sent_tokens[index] = len(c.token_ids)
            lp = (self._logprobs(c.logprobs[sent_tok:], new_ids, sent)
                  if c.logprobs is not None else None)
            finish = _finish(c.finish_reason)
            if self.chat:
                delta: dict[str, Any] = {"content": text} if text else {}
                calls = guidance.tool_calls(c.text, self.tools) if self.tools else None
                if calls:
                    delta = {"tool_calls": [{"index": 0, **calls[0]}]}
                    finish = "tool_calls"
                choices.append({"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish})
            else:
                choices.append({"index": index, "text": text, "logprobs": lp, "finish_reason": finish})
        return choices


def _finish(reason: str | None) -> str | None:
    return None if reason is None else ("stop" if reason == "abort" else reason)
