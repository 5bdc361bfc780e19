"""The server of an embedding model (`POST /v1/embeddings`, OpenAI's shape) or a reranker (`POST
/v1/rerank`, the Jina / Cohere shape vLLM and mlx-vlm answer), over `retrieval.embed` and `rerank`.

Inputs are OpenAI's (a string or a list of strings) extended as vLLM and mlx-vlm take images and videos:
an item of `input` may be a content part (`{"type": "image_url", "image_url": {"url": ...}}`, or
`video_url`) or a list of parts (one input of several), and vLLM's `messages` (a system message as the
instruction, the user message's parts as one input) stands for `input`. Media URLs are fetched under the
server's policy, as a chat request's are (media.py). Requests run one at a time on one thread, which owns
the model.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import mlx.core as mx
import numpy as np
from fastapi import Request
from pydantic import BaseModel, ConfigDict, ValidationError

from ..errors import Qwen3VLError
from ..messages import media_kind, part_options
from ..retrieval import embed_prompts, rerank_prompts
from .app import WRONG_TASK, api_app, guarded
from .fetch import download_pool, remote
from .guard import Access
from .media import MediaPolicy, VideoFile, fetch
from .protocol import ApiError, decode_body, from_user_error, part_url

ROUTES = {"embed": "/v1/embeddings", "rerank": "/v1/rerank"}


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    input: Any = None
    messages: Any = None
    model: str | None = None
    dimensions: Any = None
    encoding_format: Any = "float"
    instruction: Any = None


class RerankRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    query: Any = None
    documents: Any = None
    model: str | None = None
    top_n: Any = None
    instruction: Any = None
    return_documents: bool = True


def checked(kind: type[BaseModel], body: Any) -> BaseModel:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return kind.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ApiError(400, f"{where}: {first['msg']}", param=where) from None


def embedding_inputs(raw: EmbeddingRequest) -> tuple[list, str | None]:
    """The request's inputs (each a list of content parts) and its instruction."""
    if raw.messages is not None:
        if raw.input is not None:
            raise ApiError(400, "give either input or messages, not both", param="messages")
        if not isinstance(raw.messages, list) or not all(isinstance(m, dict) for m in raw.messages):
            raise ApiError(400, "messages must be a list of {role, content} objects", param="messages")
        system = [m for m in raw.messages if m.get("role") == "system"]
        users = [m for m in raw.messages if m.get("role") == "user"]
        if len(users) != 1 or len(system) > 1 or len(system) + len(users) != len(raw.messages):
            raise ApiError(
                400, "messages: one user message, after at most one system message", param="messages"
            )
        instruction = raw.instruction if raw.instruction is not None else _text(system[0]) if system else None
        return [parts(users[0].get("content"), "messages")], instruction
    value = raw.input
    if isinstance(value, str) or isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ApiError(400, "input must be a non-empty string or list", param="input")
    if any(isinstance(v, int) for v in value):
        raise ApiError(400, "input: token ids are not accepted, send text", param="input")
    return [parts(v, "input") for v in value], raw.instruction


def parts(value, param: str) -> list:
    """One input as content parts: a string, a part, or a list of parts."""
    if isinstance(value, str):
        return [{"type": "text", "text": value}]
    if isinstance(value, dict):
        return [value]
    if isinstance(value, list) and all(isinstance(p, (str, dict)) for p in value):
        return value
    raise ApiError(
        400, f"{param}: each input must be a string, a content part or a list of them", param=param
    )


def _text(message: dict) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    raise ApiError(400, "messages: the system message's content must be text", param="messages")


def check_instruction(value) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ApiError(400, "instruction must be a string", param="instruction")
    return value


class RetrievalServer:
    """The model, its processor and the one thread that runs them; media fetched under `policy`."""

    def __init__(self, model, processor, policy: MediaPolicy):
        self.model, self.processor, self.policy = model, processor, policy
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="mlx-qwen3vl-model")
        self.downloads = download_pool()

    def close(self) -> None:
        # The worker's MLX streams released before it ends: otherwise MLX can abort the process at exit.
        self.worker.submit(mx.clear_streams).result()
        self.worker.shutdown()
        self.downloads.shutdown(wait=False, cancel_futures=True)

    async def fetched(self, inputs: list[list], names: list[str]) -> list[list]:
        """The inputs (named in errors by `names`) with each image and video part's URL replaced by its
        bytes, fetched under the policy, all at once."""
        loop = asyncio.get_running_loop()
        media = [(i, k, p) for i, item in enumerate(inputs) for k, p in enumerate(item) if media_kind(p)]
        try:
            urls = [part_url(part, media_kind(part)) for _, _, part in media]
            data = await asyncio.gather(
                *(
                    loop.run_in_executor(
                        self.downloads if remote(url) else None,
                        fetch,
                        url,
                        self.policy,
                        f"{media_kind(part)} of {names[i]}",
                    )
                    for (i, _, part), url in zip(media, urls, strict=True)
                )
            )
        except Qwen3VLError as e:
            raise from_user_error(e) from None
        out = [list(item) for item in inputs]
        for (i, k, part), got in zip(media, data, strict=True):
            kind = media_kind(part)
            out[i][k] = {"type": kind, kind: got.data, **part_options(kind, part)}
        return out

    async def run(self, work, inputs: list[list]):
        """`work(inputs)` on the model's thread, each fetched video's bytes a temporary file meanwhile
        (OpenCV reads files)."""

        def call():
            with contextlib.ExitStack() as files:
                return work(
                    [
                        [
                            {**p, "video": files.enter_context(VideoFile(p["video"]))}
                            if media_kind(p) == "video"
                            else p
                            for p in item
                        ]
                        for item in inputs
                    ]
                )

        try:
            return await asyncio.get_running_loop().run_in_executor(self.worker, call)
        except Qwen3VLError as e:
            raise from_user_error(e) from None


def create_retrieval_app(
    model,
    processor,
    model_name: str,
    api_key: str | None = None,
    policy: MediaPolicy | None = None,
    access: Access | None = None,
):
    policy, access = policy or MediaPolicy(), access or Access()
    server = RetrievalServer(model, processor, policy)
    task = model.task

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        server.close()

    app = api_app(model_name, lifespan)
    kind = "an embedding model" if task == "embed" else "a reranker"

    @app.post("/v1/chat/completions")
    @app.post(ROUTES["rerank" if task == "embed" else "embed"])
    async def elsewhere(http: Request):
        raise ApiError(400, f"{http.url.path} needs {WRONG_TASK[http.url.path]}; {model_name} is {kind}")

    async def embeddings(http: Request):
        raw = checked(EmbeddingRequest, decode_body(await http.body()))
        if raw.encoding_format not in ("float", "base64"):
            raise ApiError(400, "encoding_format must be float or base64", param="encoding_format")
        inputs, instruction = embedding_inputs(raw)
        instruction = check_instruction(instruction)
        inputs = await server.fetched(inputs, [f"input {i + 1}" for i in range(len(inputs))])

        def work(items):  # on the model's thread, whose stream the arrays live on
            vectors, prompts = embed_prompts(model, processor, items, instruction, raw.dimensions)
            return np.array(vectors, dtype=np.float32), prompts

        vectors, prompts = await server.run(work, inputs)
        tokens = sum(len(p.ids) for p in prompts)
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode()
                if raw.encoding_format == "base64"
                else v.tolist(),
            }
            for i, v in enumerate(vectors)
        ]
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return {"object": "list", "data": data, "model": model_name, "usage": usage}

    async def rerank(http: Request):
        raw = checked(RerankRequest, decode_body(await http.body()))
        documents = raw.documents
        if not isinstance(documents, list) or not documents:
            raise ApiError(400, "documents must be a non-empty list", param="documents")
        if raw.query is None:
            raise ApiError(400, "query is required", param="query")
        top_n = raw.top_n
        if top_n is not None and (isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1):
            raise ApiError(400, f"top_n={top_n!r}: must be a whole number >= 1", param="top_n")
        # vLLM's multimodal form: {"content": [parts]} for a query or a document.
        items = [
            parts(d["content"] if isinstance(d, dict) and "content" in d else d, "documents")
            for d in documents
        ]
        query = raw.query["content"] if isinstance(raw.query, dict) and "content" in raw.query else raw.query
        instruction = check_instruction(raw.instruction)
        names = ["the query", *(f"document {i + 1}" for i in range(len(items)))]
        inputs = await server.fetched([parts(query, "query"), *items], names)
        scores, prompts = await server.run(
            lambda both: rerank_prompts(model, processor, both[0], both[1:], instruction), inputs
        )
        order = sorted(range(len(scores)), key=lambda i: -scores[i])[:top_n]
        results = []
        for i in order:
            result = {"index": i, "relevance_score": scores[i]}
            if raw.return_documents and isinstance(documents[i], str):
                result["document"] = {"text": documents[i]}
            results.append(result)
        tokens = sum(len(p.ids) for p in prompts)
        return {
            "id": f"rerank-{uuid.uuid4().hex}",
            "model": model_name,
            "usage": {"total_tokens": tokens},
            "results": results,
            "created": int(time.time()),
        }

    app.add_api_route(ROUTES[task], embeddings if task == "embed" else rerank, methods=["POST"])
    return guarded(app, policy, access, api_key)
