"""From user input to model input: chat messages rendered with the model's template, each image and video
turned into pixel rows, and each placeholder expanded to the tokens its features fill (docs/reference.md §1.7,
§5).

    inputs = processor(messages)            # or processor("Describe this.", images=["cat.jpg"])
    logits = model(**inputs)
"""

from __future__ import annotations

import json
import re
from functools import cached_property
from pathlib import Path

import numpy as np
from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, NaiveStreamingDetokenizer, TokenizerWrapper
from tokenizers.decoders import ByteLevel
from transformers import AutoTokenizer

from .config import ModelConfig
from .errors import Qwen3VLError
from .file_values import check_value
from .image import PatchSettings, image_patches, load_image, patchify
from .media import MediaItem, stack_media
from .messages import collect_media, media_arguments, normalize_messages, template_messages
from .reasoning import opens_reasoning
from .video import VideoOptions, load_video

IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO_PLACEHOLDER = "<|vision_start|><|video_pad|><|vision_end|>"
_PLACEHOLDERS = re.compile(re.escape(IMAGE_PLACEHOLDER) + "|" + re.escape(VIDEO_PLACEHOLDER))

# source_fps: the frame rate of a list of frames (for a file, it overrides the container's).
VIDEO_OPTION_NAMES = set(VideoOptions.__dataclass_fields__) | {"source_fps"}


# The byte-level alphabet's character for the space byte (GPT-2's byte-to-unicode table).
BYTE_LEVEL_SPACE = "\u0120"


class ByteLevelDetokenizer(BPEStreamingDetokenizer):
    """mlx-lm's byte-level streaming detokenizer (its token table and byte decoding), with the text kept
    as the pieces it came in. mlx-lm's appends each piece to one string the object holds, which copies
    the whole answer at every token: quadratic in a long answer's length. Here `last_segment` hands out
    the new pieces only, and `text` joins them when asked.

    The pieces are mlx-lm's: a piece waits while a character's bytes are incomplete, and a lone space
    waits for the next token. Unlike mlx-lm's, a space the answer begins with is kept (mlx-lm drops it, a
    SentencePiece convention; transformers' decode, the reference, keeps it): the streamed text is then
    exactly the decoded tokens."""

    def reset(self):
        self.offset = 0
        self.tokens: list[int] = []
        self._unflushed = ""
        self._pieces: list[str] = []
        self._handed = 0  # pieces already handed out by last_segment

    @property
    def text(self) -> str:
        return "".join(self._pieces)

    @property
    def last_segment(self) -> str:
        segment = "".join(self._pieces[self._handed :])
        self._handed = len(self._pieces)
        return segment

    def add_token(self, token):
        self.tokens.append(token)
        symbol = self.tokenmap[token] if token < len(self.tokenmap) else "!"  # (a padded vocabulary)
        self._unflushed += symbol
        text = self._decode_bytes(self._unflushed)
        if not text.endswith("\ufffd") and symbol != BYTE_LEVEL_SPACE:
            self._pieces.append(text)
            self._unflushed = ""

    def finalize(self):
        if self._unflushed:
            self._pieces.append(self._decode_bytes(self._unflushed))
            self._unflushed = ""


def load_tokenizer(path: Path, eos_token_ids=None) -> TokenizerWrapper:
    """transformers' tokenizer in mlx-lm's wrapper, with the byte-level streaming detokenizer for a
    byte-level BPE (Qwen's). mlx-lm's own loader makes the same choice by parsing the 11 MB
    tokenizer.json in Python first, a second parse after transformers' own, a quarter of the loading
    time. The loaded tokenizer's decoder says the same."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # the tokenizers library's parse errors have no type of their own
        detail = f"{type(e).__name__}: {e}".splitlines()[0]
        raise Qwen3VLError(
            f"{unreadable_tokenizer_file(path)}: cannot be read as a tokenizer ({detail})"
        ) from None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    byte_level = backend is not None and isinstance(backend.decoder, ByteLevel)
    detokenizer = ByteLevelDetokenizer if byte_level else NaiveStreamingDetokenizer
    return TokenizerWrapper(tokenizer, detokenizer, eos_token_ids=eos_token_ids)


# The tokenizer's JSON files, in the order transformers reads them.
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.json")


def unreadable_tokenizer_file(path: Path) -> Path:
    """Which of the tokenizer's files a failed load is about: the first that is not a JSON object (read
    only after a failure, so a healthy load parses the large tokenizer.json once), else the directory."""
    for name in TOKENIZER_FILES:
        try:
            _read_json(path / name)
        except Qwen3VLError:
            return path / name
    return path


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
        if template is not None and not isinstance(template, str):
            raise Qwen3VLError(f"{path / 'chat_template.json'}: chat_template must be a string")
        if template is None and (path / "chat_template.jinja").exists():
            template = (path / "chat_template.jinja").read_text()
        generation = _read_json(path / "generation_config.json")
        # Every end-of-turn id of generation_config.json stops generation (<|im_end|> and <|endoftext|>).
        eos = generation.get("eos_token_id")
        if eos is not None:
            annotation = int if not isinstance(eos, list) else list[int]
            check_value(eos, annotation, str(path / "generation_config.json"), "eos_token_id", ">= 0")
        tokenizer = load_tokenizer(path, eos_token_ids=eos)
        return cls(
            tokenizer,
            config,
            PatchSettings.from_dict(image, str(path / "preprocessor_config.json")),
            PatchSettings.from_dict(video, str(path / "video_preprocessor_config.json")),
            template,
            generation,
        )

    # ---- media ----

    def read_image(self, source, min_pixels: int | None = None, max_pixels: int | None = None) -> MediaItem:
        image = load_image(source)
        pixels, grid = image_patches(image, self.image_settings, min_pixels, max_pixels)
        item = MediaItem("image", pixels, grid, source_size=image.size)
        item.description = f"image {image.width}x{image.height} -> {self._sized(item)}"
        return item

    def read_video(
        self, source, options: VideoOptions | None = None, fps: float | None = None, reading=None
    ) -> MediaItem:
        """`reading(done, total)` sees each kept frame of a file as it is read (`load_video`)."""
        video = load_video(source, options, fps=fps, progress=reading)
        settings = self.video_settings
        pixels, grid = patchify(video.frames, settings)
        timestamps = video.group_timestamps(settings.temporal_patch_size)
        item = MediaItem("video", pixels, grid, timestamps, source_size=video.source_size)
        width, height = video.source_size
        frames = f"{len(video.frames)} frames of {width}x{height}"
        item.description = f"video, {frames} -> {grid[0]} x {self._sized(item)}"
        return item

    def _sized(self, item: MediaItem) -> str:
        _, h, w = item.grid_thw
        patch = self.image_settings.patch_size
        tokens = item.tokens(self.image_settings.merge_size)
        return f"{w * patch}x{h * patch} pixels, {tokens:,} tokens"

    def read_media(self, kind: str, source, options: dict, reading=None) -> MediaItem:
        """An image or video read, sized and cut into patches with its options (image: min_pixels,
        max_pixels; video: `VideoOptions` and source_fps)."""
        options = dict(options)
        if kind == "image":
            unknown = set(options) - {"min_pixels", "max_pixels"}
            if unknown:
                raise Qwen3VLError(f"unknown image option {sorted(unknown)[0]!r} (min_pixels, max_pixels)")
            return self.read_image(source, options.get("min_pixels"), options.get("max_pixels"))
        fps = options.pop("source_fps", None)
        unknown = set(options) - VIDEO_OPTION_NAMES
        if unknown:
            raise Qwen3VLError(
                f"unknown video option {sorted(unknown)[0]!r} ({', '.join(sorted(VIDEO_OPTION_NAMES))})"
            )
        return self.read_video(source, VideoOptions(**options), fps=fps, reading=reading)

    def read_all(self, media: list[tuple[str, object, dict]], options: dict, reading=None) -> list[MediaItem]:
        """Read `messages.collect_media` output; `options` apply to every image (min_pixels, max_pixels) or
        video (VideoOptions) unless the part sets its own. `reading`: `read_video`'s."""
        defaults = media_defaults(options)
        return [
            self.read_media(kind, source, {**defaults[kind], **own}, reading) for kind, source, own in media
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

    def media_text(self, item: MediaItem) -> str:
        """What replaces one placeholder in the prompt text, with a single pad token per block
        (docs/reference.md §5.2-§5.3 and §7: a video is one `<t
        seconds><|vision_start|><|video_pad|><|vision_end|>` block per temporal group, no outer wrapper)."""
        if item.kind == "image":
            return IMAGE_PLACEHOLDER
        return "".join(f"<{seconds:.1f} seconds>{VIDEO_PLACEHOLDER}" for seconds in item.timestamps)

    def tokenize(self, text: str, media: list[MediaItem]) -> list[int]:
        """Token ids of rendered text with each placeholder expanded, as the reference makes them: the
        whole expanded text tokenized at once, so that text before a video merges with its first
        timestamp as it does there (`"this: "` + `"<0.5 seconds>"` gives `' <'` as one token). Each
        block's pad is written once and repeated after tokenizing: pads are special tokens, which the
        tokenizer always splits on, so the text around them tokenizes the same."""
        check_unicode(text)
        pieces = _PLACEHOLDERS.split(text)
        found = _PLACEHOLDERS.findall(text)
        if len(found) != len(media):
            raise Qwen3VLError(
                f"the prompt has {len(found)} image/video placeholders for {len(media)} images/videos"
            )
        expanded, counts = [pieces[0]], []
        for placeholder, item, piece in zip(found, media, pieces[1:], strict=True):
            if (placeholder == IMAGE_PLACEHOLDER) != (item.kind == "image"):
                raise Qwen3VLError("the order of images and videos does not match their placeholders")
            expanded += [self.media_text(item), piece]
            counts += [item.tokens_per_group(self.image_settings.merge_size)] * item.groups
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

    def __call__(
        self,
        messages_or_text,
        images=None,
        videos=None,
        *,
        add_generation_prompt: bool = True,
        tools: list | None = None,
        add_vision_id: bool = False,
        **options,
    ) -> dict:
        """input_ids [1, L] and the pixel inputs, under transformers' names, ready for `model(**inputs)`,
        as transformers' processor makes them. Options apply to every image (min_pixels, max_pixels) and
        video (fps, nframes, min_pixels, max_pixels, total_pixels, video_start, video_end); a media part's
        own keys take precedence."""
        images, videos = media_arguments(images, videos)
        messages = normalize_messages(messages_or_text, images, videos)
        media = self.read_all(collect_media(messages, images, videos), options)
        kwargs = {"add_vision_id": add_vision_id} | ({"tools": tools} if tools else {})
        ids = self.tokenize(self.render(messages, add_generation_prompt, **kwargs), media)
        return {"input_ids": np.array([ids], dtype=np.int32), **stack_media(media)}


def check_unicode(text: str) -> None:
    """Refuse text the tokenizer cannot take: a lone surrogate (what Python makes of bytes that are not
    UTF-8 when it decodes with errors="surrogateescape", as for command-line arguments) would fail inside
    it as a TypeError. Text read from bytes should be decoded with errors="replace"."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise Qwen3VLError(
            f"the prompt holds {e.object[e.start]!r}, a lone surrogate that is not a character (text "
            "decoded from bytes that are not UTF-8?); decode it with errors='replace'"
        ) from None


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


def _read_json(file: Path) -> dict:
    """A JSON object from the model directory, {} when the file is absent."""
    if not file.exists():
        return {}
    try:
        content = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Qwen3VLError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(content, dict):
        raise Qwen3VLError(f"{file}: must be a JSON object, not {type(content).__name__}")
    return content
