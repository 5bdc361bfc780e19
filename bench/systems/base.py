"""What every system measures, and the one driver that runs the figures with the same repetitions.

A system implements the operations (load, preprocess, encode, generate, chat); the driver times them.
Figures a system cannot produce are left out (mlx-lm has no vision tower, transformers no MLX graph).
"""

from __future__ import annotations

import traceback

from inputs import IMAGE_QUESTION, IMAGES, VIDEO_QUESTION, Inputs
from measure import Clock, max_rss_gb, repeat

# Figure groups a spec can select (--figures).
GROUPS = ("load", "preprocess", "vision", "text", "ttft", "chat", "memory", "ops")
MEDIA = (*IMAGES, "video16")
DEFAULT_MEDIA = ("image448", "image1024x768", "video16")  # the large photo only when asked for
CHAT_IMAGE = "image1024x768"


class Unsupported(Exception):
    """This system has no such figure."""


class System:
    name = "?"
    groups: tuple[str, ...] = GROUPS

    def __init__(self, spec: dict, inputs: Inputs):
        self.spec = spec
        self.inputs = inputs
        self.dtype = spec["dtype"]
        self.bits = spec.get("bits")
        self.info: dict = {}

    # ---- what a system provides ----

    def load(self) -> None:
        """Load the model (and processor) from spec["checkpoint"], in spec dtype, quantized if asked."""
        raise Unsupported

    def preprocess(self, media: str) -> None:
        """Run the system's processor on one image (PIL) or the video (path) with its question."""
        raise Unsupported

    def vision(self, media: str) -> None:
        """Encode the shared pixel rows of one image or the video; return once evaluated."""
        raise Unsupported

    def text_generation(self, max_tokens: int) -> tuple[float, list[float], list[int]]:
        """Greedy generation after the text prompt: (seconds to the first token, the time of each token
        after the first, measured from the start, the token ids)."""
        raise Unsupported

    def image_ttft(self, image: str, preprocess: bool) -> float:
        """Seconds from the image (PIL) and question, or from the processor's output, to the first token."""
        raise Unsupported

    def chat(self, image: str, max_tokens: int) -> tuple[float, float, int]:
        """A two-turn chat about one image: (first turn's TTFT, second turn's TTFT, tokens the second
        turn had to prefill)."""
        raise Unsupported

    def peak_memory(self, image: str | None, max_tokens: int) -> float:
        """Peak memory (GB) of one generation: the text prompt (image None) or the image prompt."""
        raise Unsupported

    def decode_ops(self) -> dict:
        """MLX primitives in the graph of one decode step's logits (after a text prefill), as
        `measure.decode_step_ops` counts them: {"gpu_path": (count, histogram), "native": ...}."""
        raise Unsupported

    def bytes_per_token(self) -> int:
        """Bytes of weights a decode step reads."""
        raise Unsupported

    def drain(self) -> None:
        """Wait for any asynchronous work (outside the timed region)."""


def seconds_to_first(start_stream) -> float:
    """Seconds from calling `start_stream()` (which builds a generator of tokens or responses) to its first
    item; the generator is closed afterwards, outside the timed region."""
    with Clock() as clock:
        stream = start_stream()
        next(stream)
    stream.close()
    return clock.seconds


def _ttft_and_rates(prompt_tokens: int, result) -> dict:
    first, times, _ = result
    decode = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else float("nan")
    return {"prefill_tps": prompt_tokens / first, "decode_tps": decode, "prefill_s": first}


def run(system: System, spec: dict) -> dict:
    """Measure the selected figures; errors of one figure are recorded, never fatal."""
    runs, warmup = spec["runs"], spec["warmup"]
    groups = [g for g in spec["figures"] if g in system.groups]
    media_names = [m for m in MEDIA if m in (spec.get("media") or DEFAULT_MEDIA)]
    figures: dict = {}
    errors: dict = {}

    def attempt(group: str, fn):
        try:
            fn()
        except Unsupported:
            pass
        except Exception as e:  # a peer failing on one figure must not lose the others
            errors[group] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        system.drain()

    def timed(fn) -> float:
        with Clock() as c:
            fn()
        system.drain()
        return c.seconds

    if "load" in groups:
        load_runs = spec.get("load_runs") or runs
        attempt(
            "load",
            lambda: figures.__setitem__("load_s", repeat(lambda: timed(system.load), load_runs, warmup)),
        )
    else:
        system.load()

    for group, operation in (("preprocess", system.preprocess), ("vision", system.vision)):
        if group not in groups:
            continue
        for media in media_names:
            attempt(
                group,
                lambda g=group, op=operation, m=media: figures.__setitem__(
                    f"{g}_{m}_s", repeat(lambda: timed(lambda: op(m)), runs, warmup)
                ),
            )
    if "text" in groups:

        def text():
            n = spec["max_tokens"]
            last = {}

            def once():
                result = system.text_generation(n)
                system.drain()
                last["tokens"] = result[2]
                return _ttft_and_rates(len(system.inputs.prompt), result)

            figures.update(repeat(once, runs, warmup))
            system.info["greedy_tokens"] = last["tokens"]

        attempt("text", text)
    if "ttft" in groups:
        for image in [m for m in media_names if m in IMAGES]:
            for preprocess in (True, False):
                key = f"ttft_{image}{'' if preprocess else '_nopre'}_s"
                attempt(
                    "ttft",
                    lambda k=key, i=image, p=preprocess: figures.__setitem__(
                        k, repeat(lambda: _drained(system, system.image_ttft(i, p)), runs, warmup)
                    ),
                )
    if "chat" in groups:

        def chat():
            def once():
                first, second, prefilled = system.chat(CHAT_IMAGE, spec["chat_tokens"])
                system.drain()
                system.info["chat_turn2_prefilled_tokens"] = prefilled
                return {
                    "chat_turn1_ttft_s": first,
                    "chat_turn2_ttft_s": second,
                    "chat_speedup": first / second,
                }

            figures.update(repeat(once, runs, warmup))

        attempt("chat", chat)
    if "memory" in groups:
        attempt(
            "memory",
            lambda: figures.__setitem__("peak_memory_text_gb", system.peak_memory(None, spec["max_tokens"])),
        )
        attempt(
            "memory",
            lambda: figures.__setitem__(
                "peak_memory_image_gb", system.peak_memory(CHAT_IMAGE, spec["max_tokens"])
            ),
        )
    if "ops" in groups:

        def ops():
            counts = system.decode_ops()
            figures["decode_ops"], system.info["decode_ops_histogram"] = counts["gpu_path"]
            figures["decode_ops_native"], system.info["decode_ops_native_histogram"] = counts["native"]

        attempt("ops", ops)
    attempt("info", lambda: system.info.__setitem__("bytes_per_token", system.bytes_per_token()))
    # What of the peak memory is the weights themselves (the rest: activations, KV cache, buffers).
    attempt("info", lambda: system.info.__setitem__("parameter_gb", parameter_bytes(system.model) / 1e9))
    system.info["max_rss_gb"] = max_rss_gb()
    return {"system": system.name, "figures": figures, "info": system.info, "errors": errors}


def _drained(system: System, value: float) -> float:
    system.drain()
    return value


def question_for(media: str) -> str:
    return IMAGE_QUESTION if media in IMAGES else VIDEO_QUESTION


def parameter_bytes(model) -> int:
    if hasattr(model, "state_dict"):  # transformers' PyTorch model
        return sum(t.numel() * t.element_size() for t in model.state_dict().values())
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))
