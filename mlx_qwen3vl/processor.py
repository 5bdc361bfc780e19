"""From user input to model input: chat messages rendered with the model's template, each image and video
turned into pixel rows, and each placeholder expanded to the tokens its features fill (SPEC §1.7, §5).

    inputs = processor(messages)            # or processor("Describe this.", images=["cat.jpg"])
    logits = model(**inputs)
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, NaiveStreamingDetokenizer, TokenizerWrapper
from PIL import Image
from tokenizers.decoders import ByteLevel
from transformers import AutoTokenizer

from .config import ModelConfig
from .errors import Qwen3VLError
from .image import PatchSettings, image_from_base64, image_patches, load_image, patchify
from .reasoning import opens_reasoning
from .video import VideoOptions, load_video

IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO_PLACEHOLDER = "<|vision_start|><|video_pad|><|vision_end|>"
_PLACEHOLDERS = re.compile(re.escape(IMAGE_PLACEHOLDER) + "|" + re.escape(VIDEO_PLACEHOLDER))

# Where a content part gives its image or video: transformers' processor keys ("image" / "video", "url",
# "path", and "base64" for images), then OpenAI's ("image_url", and "video_url" as vLLM and mlx-vlm take
# it), in the order transformers looks them up.
SOURCE_KEYS = {
    "image": ("image", "url", "path", "base64", "image_url"),
    "video": ("video", "url", "path", "video_url"),
}
MEDIA_TYPES = {"image": "image", "image_url": "image", "video": "video", "video_url": "video"}
# source_fps: the frame rate of a list of frames (for a file, it overrides the container's).
VIDEO_OPTION_NAMES = set(VideoOptions.__dataclass_fields__) | {"source_fps"}


class ByteLevelDetokenizer(BPEStreamingDetokenizer):
    """mlx-lm's byte-level streaming detokenizer, keeping a space the answer begins with: mlx-lm drops
    it (a SentencePiece convention), where transformers' decode, the reference, keeps it; the streamed
    text is then exactly the decoded tokens."""

    def _maybe_trim_space(self, current_text):
        return current_text


def load_tokenizer(path: Path, eos_token_ids=None) -> TokenizerWrapper:
    """transformers' tokenizer in mlx-lm's wrapper, with the byte-level streaming detokenizer for a
    byte-level BPE (Qwen's). mlx-lm's own loader makes the same choice by parsing the 11 MB
    tokenizer.json in Python first, a second parse after transformers' own, a quarter of the loading
    time. The loaded tokenizer's decoder says the same."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    byte_level = backend is not None and isinstance(backend.decoder, ByteLevel)
    detokenizer = ByteLevelDetokenizer if byte_level else NaiveStreamingDetokenizer
    return TokenizerWrapper(tokenizer, detokenizer, eos_token_ids=eos_token_ids)


@dataclass
class EncodedMedia:
    """One image or video as model input: pixel rows, grid (t, h, w), and for a video the time of each
    temporal group."""

    pixel_values: np.ndarray
    grid_thw: tuple[int, int, int]
    timestamps: list[float] | None = None
    description: str = ""  # what the input became, for a front end: "image 4032x3024 -> ..."

    def tokens_per_group(self, merge_size: int) -> int:
        return self.grid_thw[1] * self.grid_thw[2] // merge_size**2


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


def normalize_messages(messages_or_text, images=(), videos=()) -> list[dict]:
    """Messages as a list of dicts, every field checked; content a string, None or a list of parts
    (`content_parts` gives the list). A plain string becomes one user message holding the given images,
    then videos, then the text; a bare string in a content list is a text part."""
    if isinstance(messages_or_text, str):
        content = [{"type": "image"} for _ in images or []] + [{"type": "video"} for _ in videos or []]
        return [{"role": "user", "content": content + [{"type": "text", "text": messages_or_text}]}]
    if not isinstance(messages_or_text, (list, tuple)) or not all(
        isinstance(m, dict) for m in messages_or_text
    ):
        raise Qwen3VLError("messages must be a string or a list of {'role': ..., 'content': ...} dicts")
    return [_checked_message(i, m) for i, m in enumerate(messages_or_text, start=1)]


def _checked_message(number: int, message: dict) -> dict:
    """The message with its content checked. A string (or None, as OpenAI's assistant turns with tool
    calls have) stays as it is: the templates tell an empty content from an empty list of parts."""
    where = f"message {number}"
    role = message.get("role")
    if role not in ROLES:
        problem = "has no role" if role is None else f"has role {role!r:.40}"
        raise Qwen3VLError(f"{where} {problem}: must be one of {', '.join(ROLES)}")
    content = message.get("content")
    if isinstance(content, str) or content is None:
        return message
    if not isinstance(content, (list, tuple)):
        raise Qwen3VLError(
            f"{where}: content must be a string or a list of parts, got {type(content).__name__}"
        )
    parts = [_checked_part(f"{where}, part {k}", part) for k, part in enumerate(content, start=1)]
    return {**message, "content": parts}


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


class Processor:
    def __init__(
        self,
        tokenizer: TokenizerWrapper,
        config: ModelConfig,
        image_settings: PatchSettings,
        video_settings: PatchSettings,
        chat_template: str | None = None,
        generation_config: dict | None = None,
    ):
        self.tokenizer = tokenizer
        self.config = config
        self.image_settings = image_settings
        self.video_settings = video_settings
        self.chat_template = chat_template
        self.generation_config = generation_config or {}

    @classmethod
    def from_pretrained(cls, path: Path, config: ModelConfig) -> Processor:
        if not (path / "tokenizer.json").exists() and not (path / "vocab.json").exists():
            raise Qwen3VLError(f"{path}: no tokenizer (tokenizer.json) in the model directory")
        image = _read_json(path / "preprocessor_config.json")
        video = _read_json(path / "video_preprocessor_config.json") or image
        # chat_template.json as published, or the .jinja file newer transformers write; without either,
        # the tokenizer's own (tokenizer_config.json).
        template = _read_json(path / "chat_template.json").get("chat_template")
        if template is None and (path / "chat_template.jinja").exists():
            template = (path / "chat_template.jinja").read_text()
        generation = _read_json(path / "generation_config.json")
        # Every end-of-turn id of generation_config.json stops generation (<|im_end|> and <|endoftext|>).
        eos = generation.get("eos_token_id")
        tokenizer = load_tokenizer(path, eos_token_ids=eos)
        return cls(
            tokenizer,
            config,
            PatchSettings.from_dict(image),
            PatchSettings.from_dict(video),
            template,
            generation,
        )

    # ---- media ----

    def encode_image(
        self, source, min_pixels: int | None = None, max_pixels: int | None = None
    ) -> EncodedMedia:
        image = load_image(source)
        pixels, grid = image_patches(image, self.image_settings, min_pixels, max_pixels)
        encoded = EncodedMedia(pixels, grid)
        encoded.description = f"image {image.width}x{image.height} -> {self._sized(encoded)}"
        return encoded

    def encode_video(
        self, source, options: VideoOptions | None = None, fps: float | None = None, reading=None
    ) -> EncodedMedia:
        """`reading(done, total)` sees each kept frame of a file as it is read (`load_video`)."""
        video = load_video(source, options, fps=fps, progress=reading)
        settings = self.video_settings
        pixels, grid = patchify(video.frames, settings)
        encoded = EncodedMedia(pixels, grid, video.group_timestamps(settings.temporal_patch_size))
        width, height = video.source_size
        frames = f"{len(video.frames)} frames of {width}x{height}"
        encoded.description = f"video, {frames} -> {grid[0]} x {self._sized(encoded)}"
        return encoded

    def _sized(self, media: EncodedMedia) -> str:
        t, h, w = media.grid_thw
        patch = self.image_settings.patch_size
        tokens = t * media.tokens_per_group(self.image_settings.merge_size)
        return f"{w * patch}x{h * patch} pixels, {tokens:,} tokens"

    def encode_media(self, kind: str, source, options: dict, reading=None) -> EncodedMedia:
        if kind == "image":
            unknown = set(options) - {"min_pixels", "max_pixels"}
            if unknown:
                raise Qwen3VLError(f"unknown image option {sorted(unknown)[0]!r} (min_pixels, max_pixels)")
            return self.encode_image(source, options.get("min_pixels"), options.get("max_pixels"))
        fps = options.pop("source_fps", None)
        unknown = set(options) - VIDEO_OPTION_NAMES
        if unknown:
            raise Qwen3VLError(
                f"unknown video option {sorted(unknown)[0]!r} ({', '.join(sorted(VIDEO_OPTION_NAMES))})"
            )
        return self.encode_video(source, VideoOptions(**options), fps=fps, reading=reading)

    def encode_all(
        self, media: list[tuple[str, object, dict]], options: dict, reading=None
    ) -> list[tuple[str, EncodedMedia]]:
        """Encode `collect_media` output; `options` apply to every image (min_pixels, max_pixels) or video
        (VideoOptions) unless the part sets its own. `reading`: `encode_video`'s."""
        defaults = media_defaults(options)
        return [
            (kind, self.encode_media(kind, source, {**defaults[kind], **own}, reading))
            for kind, source, own in media
        ]

    # ---- text ----

    @cached_property
    def thinks(self) -> bool:
        """Whether the template opens the answer inside a reasoning block (a Thinking model)."""
        try:
            prompt = self.render([{"role": "user", "content": "?"}], add_generation_prompt=True)
        except Qwen3VLError:
            return False
        return opens_reasoning(prompt)

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **template_kwargs) -> str:
        """The chat template's text, one placeholder per image / video."""
        try:
            return self.tokenizer.apply_chat_template(
                template_messages(messages),
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                chat_template=self.chat_template,
                **template_kwargs,
            )
        except Exception as e:  # jinja raises many types, all meaning the messages do not fit the template
            raise Qwen3VLError(f"the chat template could not render these messages: {e}") from None

    def media_text(self, kind: str, media: EncodedMedia) -> str:
        """What replaces one placeholder in the prompt text, with a single pad token per block (SPEC
        §5.2-§5.3 and §7: a video is one `<t seconds><|vision_start|><|video_pad|><|vision_end|>` block per
        temporal group, no outer wrapper)."""
        if kind == "image":
            return IMAGE_PLACEHOLDER
        return "".join(f"<{seconds:.1f} seconds>{VIDEO_PLACEHOLDER}" for seconds in media.timestamps)

    def tokenize(self, text: str, media: list[tuple[str, EncodedMedia]]) -> list[int]:
        """Token ids of rendered text with each placeholder expanded, as the reference makes them: the
        whole expanded text tokenized at once, so that text before a video merges with its first
        timestamp as it does there (`"this: "` + `"<0.5 seconds>"` gives `' <'` as one token). Each
        block's pad is written once and repeated after tokenizing: pads are special tokens, which the
        tokenizer always splits on, so the text around them tokenizes the same."""
        pieces = _PLACEHOLDERS.split(text)
        found = _PLACEHOLDERS.findall(text)
        if len(found) != len(media):
            raise Qwen3VLError(
                f"the prompt has {len(found)} image/video placeholders for {len(media)} images/videos"
            )
        expanded, counts = [pieces[0]], []
        for placeholder, (kind, encoded), piece in zip(found, media, pieces[1:], strict=True):
            if (placeholder == IMAGE_PLACEHOLDER) != (kind == "image"):
                raise Qwen3VLError("the order of images and videos does not match their placeholders")
            expanded += [self.media_text(kind, encoded), piece]
            blocks = 1 if kind == "image" else encoded.grid_thw[0]
            counts += [encoded.tokens_per_group(self.image_settings.merge_size)] * blocks
        ids = self.tokenizer.encode("".join(expanded), add_special_tokens=False)
        pads = (self.config.image_token_id, self.config.video_token_id)
        if sum(i in pads for i in ids) != len(counts):
            raise Qwen3VLError(
                "the text holds image or video pad tokens of its own (<|image_pad|>, <|video_pad|>)"
            )
        out: list[int] = []
        blocks = iter(counts)
        for i in ids:
            out += [i] * next(blocks) if i in pads else [i]
        return out

    def __call__(self, messages_or_text, images=None, videos=None, **options) -> dict:
        """input_ids [1, L] and the pixel inputs, under transformers' names, ready for `model(**inputs)`;
        the arguments are `prepare`'s."""
        return self.prepare(messages_or_text, images, videos, **options)[0]

    def prepare(
        self,
        messages_or_text,
        images=None,
        videos=None,
        *,
        add_generation_prompt: bool = True,
        tools: list | None = None,
        add_vision_id: bool = False,
        reading=None,
        **options,
    ) -> tuple[dict, list[tuple[str, EncodedMedia]]]:
        """The model's inputs (`__call__`'s) and each image and video as encoded, with what it became.
        Options apply to every image (min_pixels, max_pixels) and video (fps, nframes, min_pixels,
        max_pixels, total_pixels, video_start, video_end); a media part's own keys take precedence.
        `reading(done, total)` sees each kept frame of a video file as it is read."""
        images, videos = media_arguments(images, videos)
        messages = normalize_messages(messages_or_text, images, videos)
        encoded = self.encode_all(collect_media(messages, images, videos), options, reading)
        kwargs = {"add_vision_id": add_vision_id} | ({"tools": tools} if tools else {})
        text = self.render(messages, add_generation_prompt, **kwargs)
        ids = self.tokenize(text, encoded)
        return {"input_ids": np.array([ids], dtype=np.int32), **stack_media(encoded)}, encoded


def media_defaults(options: dict) -> dict[str, dict]:
    """Call-wide media options split into those of images (min_pixels, max_pixels) and of videos."""
    defaults = {
        "image": {k: v for k, v in options.items() if k in ("min_pixels", "max_pixels")},
        "video": {k: v for k, v in options.items() if k in VIDEO_OPTION_NAMES},
    }
    unknown = set(options) - set(defaults["image"]) - set(defaults["video"])
    if unknown:
        raise Qwen3VLError(f"unknown option {sorted(unknown)[0]!r}")
    return defaults


def stack_media(encoded: list[tuple[str, EncodedMedia]]) -> dict:
    """Concatenate the pixel rows and grids of all images and of all videos, in prompt order (a single
    one's rows as they are: a long video's are large)."""
    out = {}
    for kind, values, grids in (
        ("image", "pixel_values", "image_grid_thw"),
        ("video", "pixel_values_videos", "video_grid_thw"),
    ):
        items = [m for k, m in encoded if k == kind]
        rows = [m.pixel_values for m in items]
        out[values] = (rows[0] if len(rows) == 1 else np.concatenate(rows)) if items else None
        out[grids] = np.array([m.grid_thw for m in items], dtype=np.int64) if items else None
    return out


def _read_json(file: Path) -> dict:
    if not file.exists():
        return {}
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise Qwen3VLError(f"{file}: not valid JSON ({e})") from None
