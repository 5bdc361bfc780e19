"""OpenAI's chat-completions request, checked, and its answers: the error shape, completion objects and
stream chunks. The sampling options are checked by `options.SamplingOptions` (the same names and
ranges as the Python API and chat.py); this module checks the request's own structure.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from .. import grounding
from ..errors import Qwen3VLError
from ..messages import SOURCE_KEYS, media_parts, normalize_messages, part_options
from ..options import (
    DEFAULT_MAX_TOKENS,
    TOP_LOGPROBS,
    GenerationOptions,
    SamplingOptions,
    check_max_tokens,
    check_stop,
)
from ..processor import media_defaults
from ..tools import ToolCall, tool_names

MAX_DEPTH = 64  # levels of JSON nesting a request may use (a tool's schema nests a few)
LONE_SURROGATE = re.compile("[\ud800-\udfff]")
# Media options a request may carry as extra fields (vLLM and mlx-vlm take them so too).
MEDIA_OPTIONS = ("min_pixels", "max_pixels", "fps", "nframes", "total_pixels", "video_start", "video_end")


class ApiError(Exception):
    """A request the server refuses: HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.kind = kind or {401: "authentication_error", 404: "not_found_error"}.get(
            status, "invalid_request_error" if status < 500 else "server_error"
        )

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


def from_user_error(error: Qwen3VLError) -> ApiError:
    """A Qwen3VLError as a 400, naming the option it is about when its message starts with one."""
    match = re.match(r"(?:video option )?(\w+)=", str(error))
    return ApiError(400, str(error), param=match[1] if match else None)


def decode_body(raw: bytes) -> Any:
    """The request body as JSON, refused when it is none, nests deeper than MAX_DEPTH (code further on
    recurses through it: a deep one must be a 400 here, not a RecursionError there) or holds a lone
    surrogate (JSON's escapes allow one; UTF-8, and so the tokenizer and every answer, does not)."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not valid JSON") from None
    except RecursionError:
        raise ApiError(400, f"the request body nests deeper than {MAX_DEPTH} levels") from None
    pending = [(body, 1)]
    while pending:
        value, depth = pending.pop()
        if isinstance(value, dict):
            value = [*value, *value.values()]
        if isinstance(value, list):
            if depth > MAX_DEPTH:
                raise ApiError(400, f"the request body nests deeper than {MAX_DEPTH} levels")
            pending += [(item, depth + 1) for item in value]
        elif isinstance(value, str) and LONE_SURROGATE.search(value):
            raise ApiError(400, "the request body holds a lone UTF-16 surrogate (\\ud800 to \\udfff)")
    return body


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str = "text"
    json_schema: dict | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class ChatRequest(BaseModel):
    """The fields this server reads; others a client may send (user, metadata, ...) are ignored."""

    model_config = ConfigDict(extra="ignore")
    messages: list[dict]
    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: Any = None
    max_completion_tokens: Any = None
    temperature: Any = None
    top_p: Any = None
    top_k: Any = None
    min_p: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    repetition_penalty: Any = None
    seed: Any = None
    stop: Any = None
    n: Any = 1
    logprobs: Any = None
    top_logprobs: Any = None
    response_format: ResponseFormat | None = None
    tools: list[dict] | None = None
    tool_choice: Any = None
    min_pixels: Any = None
    max_pixels: Any = None
    fps: Any = None
    nframes: Any = None
    total_pixels: Any = None
    video_start: Any = None
    video_end: Any = None


@dataclass
class MediaRef:
    """An image or video a message names: where, as which part, with which options (the part's own over
    the request's)."""

    kind: str
    url: str
    options: dict


@dataclass
class Request:
    """A checked request, ready for the engine (the media still to fetch). `options.tools`: offered to the
    model, their calls parsed (None with tool_choice "none"); `options.logprobs`: alternatives per token,
    when log-probabilities are asked for."""

    messages: list[dict]
    media: list[MediaRef]
    options: GenerationOptions
    stream: bool = False
    include_usage: bool = False


def parse_request(body: Any) -> Request:
    """The request body (parsed JSON) checked: one ApiError for the first problem found."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        raw = ChatRequest.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ApiError(400, f"{where}: {first['msg']}", param=where) from None
    if raw.n not in (None, 1):
        raise ApiError(400, f"n={raw.n!r}: this server answers with one choice only (n=1)", param="n")
    logprobs = _logprobs(raw)
    if not raw.messages:
        raise ApiError(400, "messages: at least one message is needed", param="messages")
    tools = _tools(raw)
    try:
        limit = raw.max_completion_tokens if raw.max_completion_tokens is not None else raw.max_tokens
        max_tokens = DEFAULT_MAX_TOKENS if limit is None else check_max_tokens(limit)
        sampling = SamplingOptions(**{name: getattr(raw, name) for name in SamplingOptions.names()})
        stop = check_stop(raw.stop)
        messages = normalize_messages(raw.messages)
        schema = _schema(raw.response_format)
        options = GenerationOptions(max_tokens, sampling, stop, logprobs, tools, schema)
    except Qwen3VLError as e:
        raise from_user_error(e) from None
    defaults = media_defaults({k: getattr(raw, k) for k in MEDIA_OPTIONS if getattr(raw, k) is not None})
    media = [
        MediaRef(kind, part_url(part, kind), defaults[kind] | part_options(kind, part))
        for kind, part in media_parts(messages)
    ]
    return Request(
        messages=messages,
        media=media,
        options=options,
        stream=raw.stream,
        include_usage=bool(raw.stream_options and raw.stream_options.include_usage),
    )


def media_request(body: Any) -> tuple[str, str, dict]:
    """A `/v1/media` body, one image or video part as a message holds it (`{"type": "image_url",
    "image_url": {"url": ...}, "max_pixels": ...}`): its kind, URL and options."""
    try:
        parts = list(media_parts(normalize_messages([{"role": "user", "content": [body]}])))
    except Qwen3VLError as e:
        raise from_user_error(e) from None
    if len(parts) != 1:
        raise ApiError(400, "the body must be one image_url or video_url content part")
    kind, part = parts[0]
    return kind, part_url(part, kind), part_options(kind, part)


def _logprobs(raw: ChatRequest) -> int | None:
    """OpenAI's pair: `logprobs` (true or false) and `top_logprobs` (0 to 20, only with logprobs)."""
    if raw.logprobs not in (None, True, False):
        raise ApiError(400, f"logprobs={raw.logprobs!r:.40}: must be true or false", param="logprobs")
    if raw.top_logprobs is not None and not raw.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    if not raw.logprobs:
        return None
    try:
        return 0 if raw.top_logprobs is None else TOP_LOGPROBS.check(raw.top_logprobs)
    except Qwen3VLError as e:
        raise from_user_error(e) from None


def _tools(raw: ChatRequest) -> list[dict] | None:
    """The tools to offer: OpenAI's `tools` with `tool_choice` "auto" (the default: the model decides) or
    "none" (no tools: the template is rendered without them and the answer is text). Forcing a call
    ("required", or a named function) needs constrained decoding of the call, which this server does not
    do: refused rather than silently not forced."""
    choice = raw.tool_choice
    if choice not in (None, "auto", "none"):
        raise ApiError(
            400,
            f'tool_choice={choice!r:.60} is not supported: this server takes "auto" or "none"',
            param="tool_choice",
        )
    if not raw.tools or choice == "none":
        return None
    try:
        tool_names(raw.tools)
    except Qwen3VLError as e:
        raise ApiError(400, str(e), param="tools") from None
    return raw.tools


def part_url(part: dict, kind: str) -> str:
    """The URL (or data: URL, or allowed path) a media part names."""
    for key in SOURCE_KEYS[kind]:
        value = part.get(key)
        if isinstance(value, dict):
            value = value.get("url")
        if isinstance(value, str) and value:
            return value
        if value is not None:
            raise ApiError(400, f"a {kind} part's {key} must be a URL string", param="messages")
    raise ApiError(400, f"a {kind} part without its URL ({kind}_url: {{url: ...}})", param="messages")


def _schema(response_format: ResponseFormat | None) -> dict | None:
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return {"type": "object"}
    if response_format.type == "json_schema":
        spec = response_format.json_schema or {}
        schema = spec.get("schema")
        if not isinstance(schema, dict):
            raise ApiError(
                400,
                "response_format.json_schema.schema must be a JSON schema object",
                param="response_format",
            )
        return schema
    raise ApiError(
        400,
        f"response_format.type {response_format.type!r} is not supported (text, json_object, json_schema)",
        param="response_format",
    )


# ---- answers ----------------------------------------------------------------------------------------


def logprob_entry(entry, token_bytes) -> dict:
    """An answer.TokenLogprobs in OpenAI's words: each token as its text and its exact bytes (a token
    can hold part of a character: its text then shows U+FFFD and the bytes say what it is)."""

    def one(token: int, logprob: float) -> dict:
        data = token_bytes(token)
        return {"token": data.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(data)}

    return one(entry.token, entry.logprob) | {"top_logprobs": [one(t, lp) for t, lp in entry.top]}


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def finish(reason: str | None) -> str | None:
    """Our finish reasons in OpenAI's words."""
    return {"stop_string": "stop", "cancelled": None}.get(reason, reason)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def tool_call_entry(call: ToolCall) -> dict:
    """A call in OpenAI's words: the arguments as JSON text."""
    arguments = json.dumps(call.arguments, ensure_ascii=False)
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": arguments}}


def detections(answer: str, image_sizes: list[tuple[int, int]]) -> list[dict]:
    """What the answer locates (`grounding.parse`), in pixels of the conversation's last image, each with
    that image's index among the request's images and its size (width, height): the boxes and points a
    client draws. Empty without an image."""
    if not image_sizes:
        return []
    size = image_sizes[-1]
    return [
        {"image": len(image_sizes) - 1, "size": list(size), "label": d.label, "box": d.box, "point": d.point}
        for d in grounding.parse(answer, size)
    ]


def message(
    text: str, reasoning: str | None = None, calls: list[ToolCall] = (), located: list[dict] = ()
) -> dict:
    """The assistant's message: its content (null when it is only calls), a Thinking model's reasoning as
    `reasoning_content` (vLLM's name), its calls, and what it locates on an image (`detections`, an extra
    field that OpenAI's clients ignore; present when there are some)."""
    out = {"role": "assistant", "content": text if text or not calls else None}
    if reasoning is not None:
        out["reasoning_content"] = reasoning
    if calls:
        out["tool_calls"] = [tool_call_entry(call) for call in calls]
    if located:
        out["detections"] = list(located)
    return out


def completion(
    cid: str,
    model: str,
    message_: dict,
    reason: str | None,
    prompt_tokens: int,
    tokens: int,
    logprobs: list[dict] | None = None,
) -> dict:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message_,
                "finish_reason": finish(reason),
                "logprobs": None if logprobs is None else {"content": logprobs, "refusal": None},
            }
        ],
        "usage": usage(prompt_tokens, tokens),
    }


def stream_chunk(
    cid: str,
    model: str,
    delta: dict,
    reason: str | None = None,
    usage_: dict | None = None,
    logprobs: list[dict] | None = None,
) -> dict:
    choice = {
        "index": 0,
        "delta": delta,
        "finish_reason": finish(reason),
        "logprobs": None if logprobs is None else {"content": logprobs, "refusal": None},
    }
    choices = [] if usage_ is not None else [choice]
    out = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
    }
    if usage_ is not None:
        out["usage"] = usage_
    return out
