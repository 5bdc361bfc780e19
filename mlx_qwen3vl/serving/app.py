"""The OpenAI-compatible HTTP API over the engine, with FastAPI: `GET /health`, `GET /v1/models`,
`POST /v1/chat/completions` (streamed as server-sent events or not); besides it, the chat page (`GET /`,
chat_page.py), what an image or video becomes as the model takes it (`POST /v1/media`, for the page's
thumbnails) and the engine's counters (`GET /metrics`).

Every refusal is OpenAI's error object with a 4xx status and one line (an unknown route and a wrong
method too); a bug in one request is a 500 for it alone. Host, Origin, the API key and the body's size
are checked first (guard.py). A client that disconnects, streaming or not, cancels its request, which
stops within a token; nothing of a refused or finished request is kept but what the caches keep on
purpose (the images of accepted requests, the KV caches of answered ones).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import traceback

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from ..errors import Qwen3VLError
from .chat_page import FILES as PAGE_FILES
from .chat_page import page_file
from .engine import Engine, Event, Job
from .fetch import download_pool, remote
from .guard import Access, Guard, request_limit
from .media import MediaPolicy, MediaReader, fetch
from .protocol import (
    ApiError,
    completion,
    completion_id,
    decode_body,
    detections,
    from_user_error,
    media_request,
    message,
    parse_request,
    stream_chunk,
    tool_call_entry,
    usage,
)


def create_app(
    engine: Engine,
    model_name: str,
    api_key: str | None = None,
    policy: MediaPolicy | None = None,
    access: Access | None = None,
):
    policy, access = policy or MediaPolicy(), access or Access()
    reader = MediaReader(engine.processor)
    downloads = download_pool()  # not the default pool, which requests with inline media need too

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        downloads.shutdown(wait=False, cancel_futures=True)

    app = api_app(model_name, lifespan)
    app.state.media_reader = reader  # (for tests and logs: what it holds)

    @app.post("/v1/embeddings")
    @app.post("/v1/rerank")
    async def retrieval(http: Request):
        raise ApiError(
            400, f"{http.url.path} needs {WRONG_TASK[http.url.path]}; {model_name} is a chat model"
        )

    async def page(http: Request):
        return page_file(http.url.path)

    for path in PAGE_FILES:
        app.add_api_route(path, page, methods=["GET"], include_in_schema=False)

    @app.get("/metrics")
    async def metrics():
        running = len(engine.sequences)
        return {"tokens_generated": engine.tokens_generated, "answers_running": running}

    @app.post("/v1/media")
    async def media(http: Request):
        """What an image or video becomes (size, tokens), read as a request would read it with these
        options; kept read, so that the request that sends it next does not read it again."""
        kind, url, options = media_request(decode_body(await http.body()))
        try:
            fetched = await asyncio.get_running_loop().run_in_executor(
                downloads if remote(url) else None, fetch, url, policy, kind
            )
            item = await asyncio.to_thread(reader.item, kind, fetched, options)
        except Qwen3VLError as e:
            raise from_user_error(e) from None
        reader.keep([item])
        tokens = item.tokens(engine.processor.image_settings.merge_size)
        return {"kind": kind, "description": item.description, "tokens": tokens}

    @app.post("/v1/chat/completions")
    async def chat_completions(http: Request):
        request = parse_request(decode_body(await http.body()))
        loop = asyncio.get_running_loop()
        try:
            fetched = await asyncio.gather(
                *(
                    loop.run_in_executor(
                        downloads if remote(m.url) else None, fetch, m.url, policy, f"{m.kind} {i + 1}"
                    )
                    for i, m in enumerate(request.media)
                )
            )
        except Qwen3VLError as e:
            raise from_user_error(e) from None
        try:
            turn = await asyncio.to_thread(reader.turn, request, list(fetched))
        except Qwen3VLError as e:
            # The refusal's frames hold what was read (a large image's pixel rows): let go of them now,
            # not once the response is sent and the exception dropped.
            traceback.clear_frames(e.__traceback__)
            raise ApiError(400, str(e)) from None
        job = Job(request, turn, loop)
        engine.submit(job)
        # Until a stream takes over (it watches its client itself), the client's going away cancels the job.
        watcher = asyncio.create_task(cancel_when_gone(http, job))
        streaming = False
        try:
            first = await job.events.get()
            refuse_unless_answered(first)
            reader.keep(turn.media)
            cid = completion_id()
            if request.stream:
                streaming = True
                return StreamingResponse(
                    stream(job, first, cid, model_name, request.include_usage, image_sizes(turn)),
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache"},
                )
            text, reasoning, calls, event = [], [], [], first
            logprobs = None if request.options.logprobs is None else []
            while event.kind == "text":
                text.append(event.text)
                reasoning.append(event.reasoning)
                calls += event.tool_calls
                if logprobs is not None:
                    logprobs += event.logprobs
                event = await job.events.get()
            refuse_unless_answered(event)
        finally:
            watcher.cancel()
            if not streaming:
                job.cancel()
        thinks = engine.processor.thinks
        located = detections("".join(text), image_sizes(turn))
        answer = message("".join(text), "".join(reasoning) if thinks else None, calls, located)
        return completion(cid, model_name, answer, event.finish, event.prompt_tokens, event.tokens, logprobs)

    return guarded(app, policy, access, api_key)


# What each route needs when the server's model is not for it.
WRONG_TASK = {
    "/v1/chat/completions": "a chat model (Qwen3-VL-*-Instruct or -Thinking)",
    "/v1/embeddings": "an embedding model (Qwen3-VL-Embedding)",
    "/v1/rerank": "a reranker (Qwen3-VL-Reranker)",
}


def api_app(model_name: str, lifespan) -> FastAPI:
    """The app every server has: OpenAI's error object for every refusal (an unknown route and a wrong
    method too), a 500 for a bug in one request, `GET /health` and `GET /v1/models`."""
    app = FastAPI(title="mlx-qwen3vl", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def refused(_request: Request, error: ApiError):
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(HTTPException)
    async def no_route(request: Request, error: HTTPException):
        if error.status_code == 404:
            text = f"no such route: {request.method} {request.url.path}"
        elif error.status_code == 405:
            text = f"{request.method} is not allowed on {request.url.path}"
        else:
            text = str(error.detail)
        return JSONResponse(
            ApiError(error.status_code, text[:200]).body(),
            status_code=error.status_code,
            headers=error.headers,
        )

    @app.exception_handler(Exception)
    async def failed(_request: Request, error: Exception):
        return JSONResponse(ApiError(500, f"internal error: {type(error).__name__}").body(), status_code=500)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        entry = {"id": model_name, "object": "model", "created": created, "owned_by": "mlx-qwen3vl"}
        return {"object": "list", "data": [entry]}

    return app


def guarded(app: FastAPI, policy: MediaPolicy, access: Access, api_key: str | None) -> FastAPI:
    """Host, Origin, the API key and the body's size checked before any route (guard.py)."""
    limit = access.max_request_bytes or request_limit(policy.max_bytes)
    app.add_middleware(Guard, access=access, max_request_bytes=limit, api_key=api_key)
    return app


def refuse_unless_answered(event: Event) -> None:
    """An error event as the request's refusal; a cancelled job's (its client is gone) answers no one."""
    if event.kind == "error":
        raise ApiError(event.status, event.text)
    if event.kind == "cancelled":
        raise ApiError(499, "the client closed the request")


async def cancel_when_gone(http: Request, job: Job) -> None:
    """Cancel the job when its client disconnects. The server tells a handler only through `receive`:
    once the body is read, the next message it gives is the disconnect."""
    while (await http.receive())["type"] != "http.disconnect":
        pass
    job.cancel()


def delta(event: Event, calls_before: int) -> dict:
    """A text event as a stream's delta: reasoning (`reasoning_content`), text (`content`), each call whole
    (`tool_calls`, numbered across the answer); at least the content, for an event of log-probabilities
    alone."""
    out = {"reasoning_content": event.reasoning} if event.reasoning else {}
    if event.text or not (event.reasoning or event.tool_calls):
        out["content"] = event.text
    if event.tool_calls:
        out["tool_calls"] = [
            {"index": calls_before + i, **tool_call_entry(call)} for i, call in enumerate(event.tool_calls)
        ]
    return out


def image_sizes(turn) -> list[tuple[int, int]]:
    return [item.source_size for item in turn.media if item.kind == "image"]


async def stream(
    job: Job, first: Event, cid: str, model: str, include_usage: bool, image_sizes: list[tuple[int, int]]
):
    """Server-sent events: the role, the answer as it comes, the finish reason (with the answer's
    `detections` on the request's last image, if any), the usage if asked, [DONE]. A client gone (the
    generator closed or cancelled) cancels the job."""

    def sse(data: dict) -> str:
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    try:
        yield sse(stream_chunk(cid, model, {"role": "assistant", "content": ""}))
        event, calls, text = first, 0, []
        while event.kind == "text":
            yield sse(stream_chunk(cid, model, delta(event, calls), logprobs=event.logprobs))
            calls += len(event.tool_calls)
            text.append(event.text)
            event = await job.events.get()
        if event.kind == "error":  # after the answer started: the stream says it, as OpenAI's does
            yield sse(ApiError(event.status, event.text).body())
        else:
            located = detections("".join(text), image_sizes)
            yield sse(stream_chunk(cid, model, {"detections": located} if located else {}, event.finish))
            if include_usage:
                yield sse(stream_chunk(cid, model, {}, usage_=usage(event.prompt_tokens, event.tokens)))
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()
