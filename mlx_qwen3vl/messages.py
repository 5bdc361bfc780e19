"""What a user sends, checked: chat messages (roles, content as a string or a list of parts), where each
image and video part gives its source and options, and the `images=` / `videos=` arguments that fill the
parts without a source. Pure Python: nothing here reads a file or knows the model.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import Qwen3VLError
from .image import image_from_base64

# Where a content part gives its image or video: transformers' processor keys ("image" / "video", "url",
# "path", and "base64" for images), then OpenAI's ("image_url", and "video_url" as vLLM and mlx-vlm take
# it), in the order transformers looks them up.
SOURCE_KEYS = {
    "image": ("image", "url", "path", "base64", "image_url"),
    "video": ("video", "url", "path", "video_url"),
}
MEDIA_TYPES = {"image": "image", "image_url": "image", "video": "video", "video_url": "video"}


def media_kind(part) -> str | None:
    if not isinstance(part, dict):
        return None
    if part.get("type") in MEDIA_TYPES:
        return MEDIA_TYPES[part["type"]]
    if part.get("type") is None:  # typeless parts named by their source key
        for kind in ("image", "video"):
            if kind in part or f"{kind}_url" in part:
                return kind
    return None


def _source(part: dict, kind: str):
    """The part's own image or video, or None (then it takes the next of `images=` / `videos=`)."""
    for key in SOURCE_KEYS[kind]:
        value = part.get(key)
        if value is None:
            continue
        if isinstance(value, dict):  # OpenAI style {"image_url": {"url": ...}}
            if value.get("url") is None:
                raise Qwen3VLError(f"{key} part without a url: {value!r:.60}")
            value = value["url"]
        if key == "base64" and isinstance(value, str):  # transformers: the encoded file, no data: prefix
            return image_from_base64(value)
        return value
    return None


def media_arguments(images, videos) -> tuple[list, list]:
    """`images=` and `videos=` as lists: a single image (a path, URL, bytes, PIL image or array) or a single
    video (a path, a list of frames, or a [T, H, W, 3] array) is a list of one."""
    return _as_list(images, "images", _is_image), _as_list(videos, "videos", _is_video)


def _is_image(value) -> bool:
    return isinstance(value, (str, Path, bytes, bytearray, Image.Image, np.ndarray))


def _is_frame(value) -> bool:
    return isinstance(value, Image.Image) or (isinstance(value, np.ndarray) and value.ndim == 3)


def _is_video(value) -> bool:
    if isinstance(value, np.ndarray) and value.ndim == 4:
        return True
    frames = isinstance(value, (list, tuple)) and len(value) > 0 and all(_is_frame(f) for f in value)
    return isinstance(value, (str, Path)) or frames


def _as_list(value, name: str, is_single) -> list:
    if value is None:
        return []
    if is_single(value):
        return [list(value) if isinstance(value, np.ndarray) and name == "videos" else value]
    if not isinstance(value, (list, tuple)):
        raise Qwen3VLError(f"{name}= must be a list, got {type(value).__name__}")
    return list(value)


ROLES = ("system", "user", "assistant", "tool")
PART_TYPES = ("text", *MEDIA_TYPES)


def normalize_messages(messages_or_text, images=(), videos=(), before: list[dict] = ()) -> list[dict]:
    """Messages as a list of dicts, every field checked; content a string, None or a list of parts
    (`content_parts` gives the list). A plain string becomes one user message holding the given images,
    then videos, then the text; a bare string in a content list is a text part. `before`: the checked
    conversation these messages continue (a chat session's), which a first tool message may answer."""
    if isinstance(messages_or_text, str):
        content = [{"type": "image"} for _ in images or []] + [{"type": "video"} for _ in videos or []]
        return [{"role": "user", "content": content + [{"type": "text", "text": messages_or_text}]}]
    if not isinstance(messages_or_text, (list, tuple)) or not all(
        isinstance(m, dict) for m in messages_or_text
    ):
        raise Qwen3VLError("messages must be a string or a list of {'role': ..., 'content': ...} dicts")
    messages = [_checked_message(i, m) for i, m in enumerate(messages_or_text, start=1)]
    _check_tool_results(list(before), messages)
    return messages


def _check_tool_results(before: list[dict], messages: list[dict]) -> None:
    """Each tool message answers a call: it follows an assistant message with `tool_calls`, or another
    tool message (the results of several calls), as OpenAI's API requires. Without a call, the template
    would render a result the model never asked for."""
    previous = before[-1]["role"] if before else None
    calls = bool(before and before[-1].get("tool_calls"))
    for number, message in enumerate(messages, start=1):
        role = message["role"]
        if role == "tool" and not (previous == "tool" or (previous == "assistant" and calls)):
            after = f"after a {previous} message" if previous else "first"
            raise Qwen3VLError(
                f"message {number}: a tool message must follow the assistant message with the tool_calls "
                f"it answers, not come {after}"
            )
        if role != "tool":
            previous, calls = role, bool(message.get("tool_calls"))


def _checked_message(number: int, message: dict) -> dict:
    """The message with its content checked. A string (or None, as OpenAI's assistant turns with tool
    calls have) stays as it is: the templates tell an empty content from an empty list of parts."""
    where = f"message {number}"
    role = message.get("role")
    if role not in ROLES:
        problem = "has no role" if role is None else f"has role {role!r:.40}"
        raise Qwen3VLError(f"{where} {problem}: must be one of {', '.join(ROLES)}")
    if "tool_calls" in message:
        _check_tool_calls(where, role, message["tool_calls"])
    content = message.get("content")
    if isinstance(content, str) or content is None:
        return message
    if not isinstance(content, (list, tuple)):
        raise Qwen3VLError(
            f"{where}: content must be a string or a list of parts, got {type(content).__name__}"
        )
    parts = [_checked_part(f"{where}, part {k}", part) for k, part in enumerate(content, start=1)]
    return {**message, "content": parts}


def _check_tool_calls(where: str, role: str, calls) -> None:
    """An assistant message's `tool_calls` in OpenAI's form (`{"type": "function", "function": {"name":
    ..., "arguments": ...}}`, or the function object itself, as the template reads either): a name, and
    arguments that are an object or the JSON text of one."""
    if calls is None:
        return
    if role != "assistant":
        raise Qwen3VLError(f"{where}: only assistant messages have tool_calls, this one has role {role!r}")
    if not isinstance(calls, (list, tuple)):
        raise Qwen3VLError(f"{where}: tool_calls must be a list, got {type(calls).__name__}")
    for k, call in enumerate(calls, start=1):
        at = f"{where}, tool_calls item {k}"
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise Qwen3VLError(
                f"{at}: must be {{'function': {{'name': ..., 'arguments': ...}}}}, got {call!r:.60}"
            )
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                raise Qwen3VLError(f"{at}: arguments {function['arguments']!r:.40} is not JSON") from None
        if not isinstance(arguments, dict):
            given = function.get("arguments")
            raise Qwen3VLError(f"{at}: arguments must be a JSON object (or its JSON text), got {given!r:.40}")


def content_parts(message: dict) -> list[dict]:
    """A normalized message's content as a list of parts."""
    content = message.get("content")
    if isinstance(content, list):
        return content
    return [{"type": "text", "text": content or ""}]


def _checked_part(where: str, part) -> dict:
    if isinstance(part, str):
        return {"type": "text", "text": part}
    if not isinstance(part, dict):
        raise Qwen3VLError(f"{where}: must be a dict or a string, got {type(part).__name__}")
    kind = part.get("type")
    if kind is None and "text" in part:
        kind = "text"
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise Qwen3VLError(f"{where}: text must be a string, got {type(part.get('text')).__name__}")
        return part
    if kind not in PART_TYPES and media_kind(part) is None:
        raise Qwen3VLError(f"{where}: unknown type {kind!r:.40} (the types are {', '.join(PART_TYPES)})")
    return part


def media_parts(messages: list[dict]) -> Iterator[tuple[str, dict]]:
    """(kind, part) of every image and video part of normalized messages, in prompt order."""
    for message in messages:
        for part in content_parts(message):
            kind = media_kind(part)
            if kind is not None:
                yield kind, part


def part_options(kind: str, part: dict) -> dict:
    """A media part's own options: its keys other than its type and source (OpenAI's "detail" aside)."""
    return {k: v for k, v in part.items() if k not in ("type", "text", "detail", *SOURCE_KEYS[kind])}


def collect_media(messages: list[dict], images, videos) -> list[tuple[str, object, dict]]:
    """(kind, source, per-item options) for every image and video part, in prompt order. Parts without
    a source take the next item of `images` / `videos`."""
    supplied = {"image": list(images or []), "video": list(videos or [])}
    counts = {"image": 0, "video": 0}
    media = []
    for kind, part in media_parts(messages):
        source = _source(part, kind)
        if source is None:
            if counts[kind] >= len(supplied[kind]):
                raise Qwen3VLError(f"more {kind} placeholders in the messages than {kind}s given")
            source = supplied[kind][counts[kind]]
            counts[kind] += 1
        media.append((kind, source, part_options(kind, part)))
    for kind, given in supplied.items():
        if counts[kind] < len(given):
            raise Qwen3VLError(
                f"{len(given)} {kind}s given but the messages have only {counts[kind]} {kind} placeholders "
                "without a source"
            )
    return media


def template_messages(messages: list[dict]) -> list[dict]:
    """What the chat template sees: media parts reduced to their type (it only renders placeholders)."""
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            content = [{"type": kind} if (kind := media_kind(p)) else p for p in content]
        out.append({**message, "content": content})
    return out
