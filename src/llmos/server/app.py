"""An OpenAI-compatible HTTP API over the engine (FastAPI), so existing clients work unchanged.

Every error comes in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`:
400 for a malformed body or a bad parameter (including JSON that does not
parse and fields llmos does not implement), 401 for a wrong API key, 404 for
an unknown model or route, 503 while the engine is down. A client that
leaves, streamed or not, before or after its first token, aborts its
request, which frees its KV blocks before the engine's next step.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmos import __version__
from llmos.engine import AsyncLLM, InvalidRequestError, RequestOutput, SamplingParams
from llmos.engine.async_engine import EngineDeadError
from llmos.engine.engine import RequestFailedError
from llmos.models.config import ModelError
from llmos.server import auth, dashboard, guidance, kernel_api, messages, metrics
from llmos.server.embeddings import EMBEDDING_MODEL
from llmos.server.embeddings import router as embeddings_router
from llmos.server.protocol import (
    MAX_PROMPTS,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from llmos.server.request_log import RequestLog


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


def _validation_message(e: RequestValidationError) -> tuple[str, str | None]:
    first = e.errors()[0] if e.errors() else {}
    if first.get("type") == "json_invalid":
        reason = first.get("ctx", {}).get("error", "decode error")
        return f"the request body is not valid JSON: {reason}", None
    loc = [str(p) for p in first.get("loc", ())[1:] if not str(p).startswith(("function-", "literal["))]
    param = ".".join(loc) or None
    return f"{param or 'body'}: {first.get('msg', 'invalid request')}", param


def create_app(llm: AsyncLLM | None = None, model_name: str | None = None, api_key: str | None = None, *,
               system: Any = None, embedder: Any = None) -> FastAPI:
    """The API app. With `system` (the booted OS, server/system.py) the engine and model name come
    from it; `embedder` serves /v1/embeddings (default: the MiniLM model archival memory uses)."""
    if system is not None:
        llm = llm or system.llm
        model_name = model_name or system.model_name
    app = FastAPI(title="llmos", version=__version__)
    app.state.system = system
    app.add_middleware(RequestLog)
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return error_response(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(e)
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        if e.status_code == 404:
            message = f"unknown URL ({request.method} {request.url.path})"
        elif e.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        else:
            message = str(e.detail)
        return error_response(e.status_code, message, code="unknown_url" if e.status_code == 404 else None)

    @app.exception_handler(InvalidRequestError)
    async def _invalid(_: Request, e: InvalidRequestError) -> JSONResponse:
        return error_response(400, str(e))

    @app.exception_handler(messages.MessageError)
    async def _message(_: Request, e: messages.MessageError) -> JSONResponse:
        return error_response(400, str(e), param=e.param)

    @app.exception_handler(ModelError)
    async def _model(_: Request, e: ModelError) -> JSONResponse:
        return error_response(400, str(e))

    @app.exception_handler(RequestFailedError)
    async def _failed(_: Request, e: RequestFailedError) -> JSONResponse:
        return error_response(500, str(e), "server_error")

    @app.exception_handler(EngineDeadError)
    async def _dead(_: Request, e: EngineDeadError) -> JSONResponse:
        return error_response(503, str(e), "service_unavailable")

    # Every request runs as a user (server/auth.py): the local user while no key is configured.
    auth.install(app, auth.Authenticator(system.users if system is not None else None,
                                         api_key or (system.api_key if system is not None else None),
                                         system.local_key if system is not None else None))

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    app.include_router(embeddings_router(embedder))
    if system is not None:  # Letta's agents API; its GET /v1/models/ (slash) comes before OpenAI's
        from llmos.server.agents_api import router as agents_router

        app.include_router(agents_router)
        kernel_api.install(app)
        from llmos.server import approvals_api, mcp_api, remote_api

        approvals_api.install(app)  # /v1/approvals: human approval of parked tool calls
        mcp_api.install(app)  # /v1/mcp: MCP servers' tools as pinned syscalls
        remote_api.install(app)  # /v1/remote: agent programs in other processes
    pool = hasattr(llm, "generate_final")  # a replica pool (replicas/): no one engine's block map to draw
    # GET /dashboard: the live view of this OS (a pool: its replicas' rows instead of a block map)
    dashboard.install(app, None if pool else llm, llm if pool else None)
    if llm is None:
        return app
    tokenizer = llm.tokenizer
    knows_tools = messages.template_knows_tools(tokenizer.chat_template if tokenizer else None)

    def check_model(name: str | None) -> None:
        if name and name != model_name:
            raise APIError(404, f"model {name!r} does not exist; this server runs {model_name!r}",
                           param="model", code="model_not_found")

    def model_card(name: str) -> dict[str, Any]:
        card = {"id": name, "object": "model", "created": created, "owned_by": "llmos"}
        return {**card, "max_model_len": llm.engine.max_model_len} if name == model_name else card

    @app.get("/health")
    async def health() -> Response:
        if llm.is_dead:
            raise EngineDeadError("the engine is not running")
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(model_name), model_card(EMBEDDING_MODEL)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        if model_id not in (model_name, EMBEDDING_MODEL):
            raise APIError(404, f"model {model_id!r} does not exist", param="model", code="model_not_found")
        return model_card(model_id)

    @app.get("/metrics")
    async def prometheus() -> Response:
        histograms = await llm.call(llm.engine.histograms.snapshot)
        stats, programs = await llm.stats(), None
        if system is not None:  # the kernel's: KV retained across tool calls, each process as a program
            kernel = await system.kernel.stats()
            stats, programs = {**kernel["engine"], **stats}, kernel["programs"]
        body, content_type = metrics.render(stats, histograms, programs)
        if pool:  # and each replica's, labelled replica="i"
            body += llm.replica_metrics()
        return Response(body, media_type=content_type)

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> dict[str, Any]:
        check_model(req.model)
        if req.messages is not None:
            ids = tokenizer.encode_chat(messages.normalise(req.messages, knows_tools))
        elif req.prompt is not None:
            messages.check_unicode(req.prompt, "prompt")
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
    async def completions(req: CompletionRequest, request: Request):
        check_model(req.model)
        _refuse_unsupported(req)
        prompts = _prompts(req.prompt)
        if req.echo and req.logprobs is not None:
            raise APIError(400, "echo with logprobs is not supported (llmos returns no prompt logprobs)",
                           param="echo")
        params = _params(req, req.max_tokens if req.max_tokens is not None else 16, req.logprobs)
        echo = [p if isinstance(p, str) else tokenizer.decode(p) for p in prompts] if req.echo else None
        return await _respond(llm, request, req, prompts, params, _Shape(llm, "text_completion", model_name,
                                                                           params.n, echo=echo))

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request):
        check_model(req.model)
        _refuse_unsupported(req)
        chat_messages = messages.normalise(req.messages, knows_tools)
        try:
            schema, tool_mode = guidance.constraint(req)
        except guidance.GuidanceError as e:
            raise APIError(400, str(e), param="tool_choice" if req.tools else "response_format") from None
        tools = req.tool_dicts() if tool_mode else None
        if tools and not knows_tools:
            chat_messages = messages.with_system_text(chat_messages,
                                                      guidance.tools_prompt(tools, req.parallel_tool_calls))
        try:
            ids = tokenizer.encode_chat(chat_messages, **({"tools": tools} if tools and knows_tools else {}))
        except (TypeError, KeyError) as e:
            raise APIError(400, f"messages do not fit the chat template: {e}", param="messages") from None
        limit = req.max_completion_tokens or req.max_tokens
        top = (req.top_logprobs or 0) if req.logprobs else None
        params = _params(req, limit, top)
        params.json_schema = schema
        shape = _Shape(llm, "chat.completion", model_name, params.n, tools, req.parallel_tool_calls)
        return await _respond(llm, request, req, [ids], params, shape)

    return app


def _refuse_unsupported(req) -> None:
    if (name := req.unsupported()) is not None:
        raise APIError(400, f"{name} is not supported by llmos", param=name, code="unsupported_parameter")


def _prompts(prompt: str | list[int] | list[str] | list[list[int]]) -> list[str | list[int]]:
    messages.check_unicode(prompt, "prompt")
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError(400, "prompt is empty", param="prompt")
    if all(isinstance(t, int) for t in prompt):
        return [prompt]
    if len(prompt) > MAX_PROMPTS:
        raise APIError(400, f"a prompt list holds at most {MAX_PROMPTS} prompts, got {len(prompt)}",
                       param="prompt")
    return list(prompt)


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float]:
    out = {}
    for key, value in (bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            raise APIError(400, f"logit_bias keys must be token ids, got {key!r}",
                           param="logit_bias") from None
        if not (math.isfinite(value) and -100 <= value <= 100):
            raise APIError(400, f"logit_bias values must be in [-100, 100], got {value}", param="logit_bias")
        out[token] = value
    return out


def _params(req, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    return SamplingParams(n=req.n, max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                          top_k=req.top_k, min_p=req.min_p, seed=req.seed, stop=stop,
                          stop_token_ids=req.stop_token_ids or [], ignore_eos=req.ignore_eos,
                          logprobs=logprobs,
                          presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                          repetition_penalty=req.repetition_penalty, logit_bias=_logit_bias(req.logit_bias))


async def _until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _respond(llm: AsyncLLM, request: Request, req, prompts, params: SamplingParams, shape: _Shape):
    owners = dashboard.owners_of(request.app)  # the dashboard names whose blocks these are
    owners.add(shape.rid, request.state.user)
    streams = [llm.generate(p, params, f"{shape.rid}-{i}") for i, p in enumerate(prompts)]
    if req.stream:
        return _EventStream(_sse(request, shape, streams, req.include_usage), media_type="text/event-stream")
    # a replica pool re-runs a whole answer from its prompt elsewhere if its replica dies
    final = getattr(llm, "generate_final", None)
    tasks = [asyncio.ensure_future(final(p, params, f"{shape.rid}-{i}") if final else _last(s))
             for i, (p, s) in enumerate(zip(prompts, streams, strict=True))]
    work = asyncio.gather(*tasks)
    gone = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait([gone, work], return_when=asyncio.FIRST_COMPLETED)
        if not work.done():  # the client left: nobody reads the answer, so stop computing it
            return Response(status_code=499)
        finals: list[RequestOutput] = work.result()
    finally:  # one prompt failed, or the client left: abort the rest
        gone.cancel()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        owners.discard(shape.rid)
        if work.done() and not work.cancelled():
            work.exception()  # retrieved: raised above when it matters
    body = shape.full(finals)
    request.state.usage = body["usage"]
    return body


class _EventStream(StreamingResponse):
    """A server-sent event stream that stops the moment its client leaves, even before it has sent
    anything (Starlette only notices on its next write under ASGI 2.4): stopping closes the body
    generator, which aborts its requests."""

    async def __call__(self, scope, receive, send) -> None:
        async with anyio.create_task_group() as group:

            async def stream() -> None:
                await self.stream_response(send)
                group.cancel_scope.cancel()

            group.start_soon(stream)
            await self.listen_for_disconnect(receive)
            group.cancel_scope.cancel()


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


async def _sse(request: Request, shape: _Shape, streams, include_usage: bool) -> AsyncIterator[str]:
    merged = _merge(streams)
    try:
        for c in range(shape.n * len(streams)):
            if shape.chat:
                yield _event(shape.chunk([{"index": c, "delta": {"role": "assistant", "content": ""},
                                           "logprobs": None, "finish_reason": None}]))
            elif shape.echo:
                yield _event(shape.chunk([{"index": c, "text": shape.echo[c // shape.n], "logprobs": None,
                                           "finish_reason": None}]))
        finals: dict[int, RequestOutput] = {}
        async for i, out in merged:
            choices = shape.deltas(i, out)
            if choices:
                yield _event(shape.chunk(choices))
            if out.finished:
                finals[i] = out
        usage = shape.usage([finals[i] for i in sorted(finals)])
        request.state.usage = usage
        if include_usage:
            yield _event({**shape.chunk([]), "usage": usage})
        yield "data: [DONE]\n\n"
    except (InvalidRequestError, EngineDeadError, RuntimeError) as e:
        yield _event({"error": {"message": str(e), "type": "invalid_request_error"
                                if isinstance(e, InvalidRequestError) else "server_error",
                                "param": None, "code": None}})
    finally:  # a client that left closes this generator: abort every prompt at once
        await merged.aclose()
        dashboard.owners_of(request.app).discard(shape.rid)


def _event(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


class _Shape:
    """Builds OpenAI response bodies (full and streamed) from engine outputs."""

    def __init__(self, llm: AsyncLLM, kind: str, model: str, n: int,
                 tools: list[dict[str, Any]] | None = None, parallel: bool = True,
                 echo: list[str] | None = None) -> None:
        self.tok, self.kind, self.model, self.n = llm.tokenizer, kind, model, n
        self.rid = f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex}"
        self.tools = tools  # replies may be tool calls: they are sent whole, when finished
        self.parallel = parallel
        self.echo = echo  # completions: the prompt text each choice starts with
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

    def _calls(self, text: str) -> list[dict[str, Any]] | None:
        return guidance.tool_calls(text, self.tools, self.parallel) if self.tools else None

    def _choice(self, index: int, text: str, finish: str | None, logprobs) -> dict[str, Any]:
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            calls = self._calls(text)
            if calls:
                message, finish = {"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls"
            return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish}
        prefix = self.echo[index // self.n] if self.echo else ""
        return {"index": index, "text": prefix + text, "logprobs": logprobs, "finish_reason": finish}

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
                calls = self._calls(c.text)
                if calls:
                    delta = {"tool_calls": [{"index": j, **call} for j, call in enumerate(calls)]}
                    finish = "tool_calls"
                choices.append({"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish})
            else:
                choices.append({"index": index, "text": text, "logprobs": lp, "finish_reason": finish})
        return choices


def _finish(reason: str | None) -> str | None:
    return None if reason is None else ("stop" if reason == "abort" else reason)
