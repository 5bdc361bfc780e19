"""This package, through its public API (`load`, `stream_generate`, `ChatSession`) and, for the
figures without preprocessing, the turn path `stream_generate` runs (`Turn`, `PrefixCache.remainder`,
`generate_step`) from media already read."""

from __future__ import annotations

import json
from pathlib import Path

import graph
import mlx.core as mx
from inputs import FOLLOW_UP, IMAGE_QUESTION, VIDEO_FRAMES
from measure import Clock, decode_step_ops, fresh_caches, mlx_memory, quantize, weight_bytes_per_token
from mlx.utils import tree_flatten, tree_unflatten

from mlx_qwen3vl import ChatSession, PromptCache, load, stream_generate
from mlx_qwen3vl.generation import generate_step, generation_stream, prefill
from mlx_qwen3vl.loading import in_compute_dtype
from mlx_qwen3vl.options import GenerationOptions
from mlx_qwen3vl.prefix_cache import PrefixCache
from mlx_qwen3vl.turn import Turn

from .base import System as Base
from .base import question_for, seconds_to_first


class System(Base):
    name = "ours"

    def load(self) -> None:
        self.model = self.processor = None
        if not self.bits:
            self.model, self.processor = load(self.spec["checkpoint"], dtype=self.dtype)
            return
        # As a checkpoint written by convert.py loads: quantized from the stored bfloat16 weights (the
        # peers' quantization, bit for bit), scales kept in bfloat16, everything else in our dtype.
        self.model, self.processor = load(self.spec["checkpoint"], dtype="bfloat16", lazy=True)
        self.info["quantized_layers"] = quantize(self.model, self.bits, skip=("model.visual",))
        backend = type(self.model.backend).choose(self.model.backend.name, self.dtype)
        backend.specialize(self.model)  # the quantized layers' CPU versions, as load() swaps them in
        self.model.backend = backend
        params = dict(tree_flatten(self.model.parameters()))
        weights = in_compute_dtype(self.model, params, backend.dtype)
        self.model.update(tree_unflatten(list(weights.items())))
        mx.eval(self.model.parameters())

    def drain(self) -> None:
        mx.synchronize(generation_stream)
        mx.synchronize()

    def _turn(self, media: str, max_tokens: int = 2) -> Turn:
        options = GenerationOptions(max_tokens)
        if media == "video16":
            videos = [self.inputs.video]
            return Turn.from_prompt(
                self.processor, question_for(media), None, videos, options, nframes=VIDEO_FRAMES
            )
        return Turn.from_prompt(
            self.processor, question_for(media), [self.inputs.images[media]], None, options
        )

    def preprocess(self, media: str) -> None:
        turn = self._turn(media)
        self.info[f"{media}_prompt_tokens"] = len(turn.ids)
        self.info[f"{media}_grid"] = [list(item.grid_thw) for item in turn.media]

    def vision(self, media: str) -> None:
        pixels, grid = self.inputs.vision[media]
        encoded = self.model.encode_vision(pixels, grid)
        mx.eval(encoded.features, encoded.deepstack)

    def _first_token(self, turn: Turn):
        """stream_generate's steps after the processor: encode, place, prefill, sample."""
        cache = PrefixCache(self.model)
        prepared = cache.remainder(turn)
        return cache.kv, generate_step(self.model, prepared, cache.kv, max_tokens=turn.options.max_tokens)

    def text_generation(self, max_tokens: int):
        turn = Turn(self.processor, self.inputs.prompt.tolist(), [], GenerationOptions(max_tokens))
        with Clock() as clock:
            _, steps = self._first_token(turn)
            tokens, times = [], []
            for token, _ in steps:
                times.append(clock.lap())
                tokens.append(token)
        return times[0], times, tokens

    def image_ttft(self, image: str, preprocess: bool) -> float:
        if preprocess:
            return seconds_to_first(
                lambda: stream_generate(
                    self.model,
                    self.processor,
                    IMAGE_QUESTION,
                    images=[self.inputs.images[image]],
                    max_tokens=2,
                    temperature=0.0,
                )
            )
        turn = self._turn(image)
        return seconds_to_first(lambda: self._first_token(turn)[1])

    def chat(self, image: str, max_tokens: int):
        session = ChatSession(self.model, self.processor, max_tokens=max_tokens, temperature=0.0)
        seconds = []
        for content, images in ((IMAGE_QUESTION, [self.inputs.images[image]]), (FOLLOW_UP, None)):
            with Clock() as clock:
                answer = session.ask(content, images=images)
                next(answer)
            seconds.append(clock.seconds)
            for _ in answer:
                pass
        return seconds[0], seconds[1], session.prefilled

    def peak_memory(self, image: str | None, max_tokens: int) -> float:
        self.drain()
        mlx_memory(reset=True)
        if image is None:
            self.text_generation(max_tokens)
        else:
            responses = stream_generate(
                self.model,
                self.processor,
                IMAGE_QUESTION,
                images=[self.inputs.images[image]],
                max_tokens=max_tokens,
                temperature=0.0,
            )
            for _ in responses:
                pass
        self.drain()
        return mlx_memory()

    def decode_ops(self):
        model = self.model
        cache = model.make_cache()
        prepared = model.prepare(self.inputs.prompt[None], cache=cache)
        token = mx.argmax(prefill(model, prepared, cache), axis=-1)
        mx.eval(token, [c.state for c in cache])

        def step(model=model, cache=cache):  # what generate_step runs for each token
            fresh = PromptCache(fresh_caches(cache), cache.rope_delta)
            return model(token[None], cache=fresh)[:, -1]

        counts = decode_step_ops(step)
        if model.backend.name != "gpu":  # the GPU path's own graph, from a model of no memory
            config = json.loads((Path(self.spec["checkpoint"]) / "config.json").read_text())
            counts["gpu_path"] = graph.ours_decode_step(graph.ours(config, self.bits, self.dtype))
        return counts

    def bytes_per_token(self) -> int:
        tied = self.model.config.tie_word_embeddings
        return weight_bytes_per_token(
            self.model,
            ("model.language_model", "lm_head"),
            "model.language_model.embed_tokens",
            tied,
            self.model.config.text_config.moe,
        )
