"""The options a user sets, defined once: their names, types, ranges and defaults. The Python API
(`SamplingOptions`, `generate`, `ChatSession`) checks them here, and chat.py builds its arguments from the
same definitions, so every entry point accepts and refuses the same values with the same message.

Pure Python (no mlx, no transformers): chat.py and convert.py import it before parsing their arguments,
so `--help` and argument errors answer at once.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, fields

from .errors import Qwen3VLError

DEFAULT_MODEL = "Qwen/Qwen3-VL-4B-Instruct"
DTYPE_NAMES = ("bfloat16", "float16", "float32")
DEFAULT_MAX_TOKENS = 512

# convert.py's quantization: MLX's affine bit widths and group sizes, and mlx-lm's mixed recipes
# "mixed_<low>_<high>" (v_proj and down_proj of the most sensitive decoder layers, the first and last
# eighth and every third between, at <high> bits, the rest at <low>), named here so that the converter's
# --help needs no mlx-lm import; tests/test_convert.py checks them against mlx-lm's list.
BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
DEFAULT_BITS, DEFAULT_GROUP_SIZE = 4, 64
RECIPES = ("mixed_2_6", "mixed_3_4", "mixed_3_6", "mixed_4_6")
# The recipe that measures each layer on the calibration set and picks its bits for a target average
# (auto_bits.py); not one of mlx-lm's, so kept apart from RECIPES.
AUTO_RECIPE = "auto"

# The ranges an option may have, by the words its error message uses.
_RANGES = {
    "a number": lambda v: True,
    "a whole number": lambda v: True,
    ">= 0": lambda v: v >= 0,
    ">= 1": lambda v: v >= 1,
    ">= 2": lambda v: v >= 2,
    "> 0": lambda v: v > 0,
    "in [0, 1]": lambda v: 0 <= v <= 1,
    "in [0, 20]": lambda v: 0 <= v <= 20,
    "in [0, 65535]": lambda v: 0 <= v <= 65535,
}


@dataclass(frozen=True)
class NumberOption:
    """A finite number (`kind` float), or a whole number (`kind` int), within `requirement`."""

    name: str
    kind: type
    requirement: str
    help: str | None = None

    @property
    def rule(self) -> str:
        if self.requirement in ("a number", "a whole number"):
            return self.requirement
        return f"{'a whole number' if self.kind is int else 'a number'} {self.requirement}"

    def check(self, value):
        """The value as `kind`, or a Qwen3VLError naming the option and its range. Strings, booleans, NaN
        and infinities are refused: they reach the sampler as garbage (`temperature=inf` samples
        uniformly) or fail deep inside generation."""
        ok = (
            isinstance(value, numbers.Real)
            and not isinstance(value, bool)
            and math.isfinite(value)
            and (self.kind is float or float(value).is_integer())
            and _RANGES[self.requirement](value)
        )
        if not ok:
            raise Qwen3VLError(f"{self.name}={value!r} is out of range: must be {self.rule}")
        return self.kind(value)

    def parse(self, text: str):
        """For command-line arguments: the text as a number, checked (ValueError: argparse's own
        one-line `argument --name: ...` error)."""
        whole = self.kind is int
        try:
            value = int(text) if whole else float(text)
        except ValueError:
            raise ValueError(f"{text!r} is not {'a whole number' if whole else 'a number'}") from None
        try:
            return self.check(value)
        except Qwen3VLError:
            raise ValueError(f"{text} is out of range: must be {self.rule}") from None


def _options(*options: NumberOption) -> dict[str, NumberOption]:
    return {o.name: o for o in options}


SAMPLING = _options(
    NumberOption("temperature", float, ">= 0", "0: greedy"),
    NumberOption("top_p", float, "in [0, 1]"),
    NumberOption("top_k", int, ">= 0"),
    NumberOption("min_p", float, "in [0, 1]"),
    NumberOption("repetition_penalty", float, "> 0"),
    NumberOption("presence_penalty", float, "a number"),
    NumberOption("frequency_penalty", float, "a number"),
    NumberOption("seed", int, "a whole number"),
)
MAX_TOKENS = NumberOption("max_tokens", int, ">= 1", "per answer")
# How many most likely alternatives to report with each token's log-probability (OpenAI's limit; the
# server takes it as top_logprobs).
LOGPROBS = NumberOption("logprobs", int, "in [0, 20]")
TOP_LOGPROBS = NumberOption("top_logprobs", int, "in [0, 20]")
MAX_BATCH = NumberOption("max_batch", int, ">= 1", "answers the server decodes together")
# server.py's own settings (0: a port the system picks).
PORT = NumberOption("port", int, "in [0, 65535]")
MAX_MEDIA_BYTES = NumberOption("max_media_bytes", int, ">= 1", "largest image or video a request may send")
CACHE_GB = NumberOption("cache_gb", float, ">= 0", "memory for the kept KV caches, in GB")
CACHE_BYTES = NumberOption("cache_bytes", int, ">= 0")
# What chat.py offers of the media options; the processor checks every media option where it is defined
# (image.py, video.py VideoOptions), these only parse the command line.
MEDIA = _options(
    NumberOption("fps", float, "> 0", "video frames sampled per second"),
    NumberOption("nframes", int, ">= 2", "video frames in all"),
    NumberOption("min_pixels", int, ">= 1", "per image or video frame"),
    NumberOption("max_pixels", int, ">= 1", "per image or video frame"),
)


# KV-cache quantization (mlx-lm's QuantizedKVCache): keys and values stored as MLX's affine 8- or 4-bit
# values in groups of `group_size` along the head dimension, with a scale and a bias per group (64:
# mlx-lm's default).
KV_BITS = (4, 8)
KV_GROUP_SIZES = (32, 64, 128)
DEFAULT_KV_GROUP_SIZE = 64


def _choice(name: str, value, allowed: tuple[int, ...], note: str = "") -> int:
    """A whole number among `allowed`, or a Qwen3VLError naming the option and its choices."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value not in allowed:
        choices = ", ".join(str(a) for a in allowed[:-1]) + f" or {allowed[-1]}"
        raise Qwen3VLError(f"{name}={value!r:.40} is not supported: must be {choices}{note}")
    return int(value)


@dataclass(frozen=True)
class KVCacheOptions:
    """How the KV cache stores keys and values: `bits` 8 or 4 (None: unquantized, in the activation
    dtype), in groups of `group_size`."""

    bits: int | None = None
    group_size: int = DEFAULT_KV_GROUP_SIZE

    def __post_init__(self):
        if self.bits is not None:
            object.__setattr__(self, "bits", _choice("kv_bits", self.bits, KV_BITS, " (None: unquantized)"))
        object.__setattr__(self, "group_size", _choice("kv_group_size", self.group_size, KV_GROUP_SIZES))


def check_max_tokens(value) -> int:
    return MAX_TOKENS.check(value)


# Stop strings: at most MAX_STOPS (OpenAI's limit) of at most MAX_STOP_CHARS characters each. Every token,
# the text that could still begin a stop string is held back from the stream and looked at again for each
# stop string, so these two bound both the work per token and how much text a stream may hold back. The
# length is far above any end marker or delimiter a client stops at (a closing tag, a role prefix, a
# fence), and under what would hold back a paragraph.
MAX_STOPS = 4
MAX_STOP_CHARS = 256


def check_stop(stop) -> list[str]:
    """`stop`: None, a string or a list of strings (at most MAX_STOPS, each at most MAX_STOP_CHARS
    characters); as a list without empty strings."""
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise Qwen3VLError(f"stop={stop!r:.80}: must be a string or a list of strings")
    if len(stop) > MAX_STOPS:
        raise Qwen3VLError(f"stop=[{len(stop):,} strings]: at most {MAX_STOPS} stop strings are allowed")
    for s in stop:
        if len(s) > MAX_STOP_CHARS:
            raise Qwen3VLError(
                f"stop={s!r:.40}...: a stop string may hold at most {MAX_STOP_CHARS} characters, "
                f"this one holds {len(s):,}"
            )
    return [s for s in stop if s]


@dataclass
class SamplingOptions:
    """Sampling settings; None takes the model's generation_config.json (then greedy)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    seed: int | None = None
    frequency_penalty: float | None = None

    def __post_init__(self):
        for option in fields(self):
            value = getattr(self, option.name)
            if value is not None:
                setattr(self, option.name, SAMPLING[option.name].check(value))

    @classmethod
    def names(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    def with_defaults(self, defaults: dict) -> SamplingOptions:
        """Fill unset options from generation_config.json (its sampling applies only when do_sample)."""
        sampling = defaults.get("do_sample", False)
        pick = {
            "temperature": defaults.get("temperature") if sampling else 0.0,
            "top_p": defaults.get("top_p") if sampling else None,
            "top_k": defaults.get("top_k") if sampling else None,
            "repetition_penalty": defaults.get("repetition_penalty"),
        }
        values = {k: getattr(self, k) for k in self.names()}
        for name, value in pick.items():
            if values[name] is None:
                values[name] = value
        return SamplingOptions(**values)

    def sampler(self):
        """mlx-lm's sampler for these settings; None for greedy decoding (an argmax of the logits)."""
        from mlx_lm.sample_utils import make_sampler

        if not self.temperature:
            return None
        return make_sampler(
            temp=self.temperature or 0.0,
            top_p=self.top_p or 0.0,
            min_p=self.min_p or 0.0,
            top_k=self.top_k or 0,
        )

    def logits_processors(self):
        from mlx_lm.sample_utils import make_logits_processors

        repetition = self.repetition_penalty if self.repetition_penalty not in (None, 1.0) else None
        return make_logits_processors(
            repetition_penalty=repetition,
            presence_penalty=self.presence_penalty or None,
            frequency_penalty=self.frequency_penalty or None,
        )


@dataclass
class GenerationOptions:
    """How one answer is generated, checked where a request enters (before any media is read):
    `max_tokens`, `sampling` (unset values later filled from the model's generation_config.json), `stop`
    strings, `logprobs` (alternatives reported per token, or None), the `tools` offered (OpenAI's function
    definitions) and a `json_schema` the answer must follow (a dict or its JSON text; kept as its
    checked grammar)."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None
    tools: list | None = None
    json_schema: object = None
    grammar: str | None = field(default=None, init=False)

    def __post_init__(self):
        self.max_tokens = check_max_tokens(self.max_tokens)
        self.stop = check_stop(self.stop)
        if self.logprobs is not None:
            self.logprobs = LOGPROBS.check(self.logprobs)
        if self.tools:
            from .tools import tool_names

            tool_names(self.tools)
        self.tools = self.tools or None
        if self.json_schema is not None:
            from .structured import check_schema

            self.grammar = check_schema(self.json_schema)
