"""mlx-vlm 0.7.10 on the same checkpoint directory (it converts transformers' layout itself), through
its public API: `load`, `apply_chat_template`, `prepare_inputs`, `stream_generate` (with its
`PromptCacheState` for the second chat turn), `generate_step`, and the model's `vision_tower`.

mlx-vlm has no dtype option: it keeps the checkpoint's bfloat16; other dtypes are applied with
`set_dtype` after loading (what a user would do)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from inputs import FOLLOW_UP, IMAGE_QUESTION, VIDEO_FRAMES, VIDEO_QUESTION
from measure import Clock, decode_step_ops, fresh_caches, mlx_memory, quantize, weight_bytes_per_token
from mlx_vlm import load, prepare_inputs, stream_generate
from mlx_vlm.generate import generate_step
from mlx_vlm.generate.common import PromptCacheState, generation_stream
from mlx_vlm.models import cache as vlm_cache
from mlx_vlm.prompt_utils import apply_chat_template

from .base import System as Base
from .base import seconds_to_first

DTYPES = {"bfloat16": mx.bfloat16, "float32": mx.float32, "float16": mx.float16}


class System(Base):
    name = "mlx-vlm"

    def load(self) -> None:
        self.model = self.processor = None
        self.model, self.processor = load(self.spec["checkpoint"])
        if self.dtype != "bfloat16":
            self.model.set_dtype(DTYPES[self.dtype])
        if self.bits:
            self.info["quantized_layers"] = quantize(self.model, self.bits, skip=("vision_tower",))
        mx.eval(self.model.parameters())

    def drain(self) -> None:
        mx.synchronize(generation_stream)
        mx.synchronize()

    def _prompt(self, question: str, **media) -> str:
        return apply_chat_template(self.processor, self.model.config, question, **media)

    def _process(self, media: str) -> dict:
        config = self.model.config
        if media == "video16":
            prompt = self._prompt(VIDEO_QUESTION, video=[self.inputs.video])
            return prepare_inputs(
                self.processor,
                videos=[self.inputs.video],
                prompts=prompt,
                image_token_index=config.image_token_index,
                nframes=VIDEO_FRAMES,
            )
        prompt = self._prompt(IMAGE_QUESTION, num_images=1)
        return prepare_inputs(
            self.processor,
            images=[self.inputs.images[media]],
            prompts=prompt,
            image_token_index=config.image_token_index,
        )

    def preprocess(self, media: str) -> None:
        inputs = self._process(media)
        mx.eval([v for v in inputs.values() if isinstance(v, mx.array)])
        grid = inputs.get("image_grid_thw", inputs.get("video_grid_thw"))
        self.info[f"{media}_prompt_tokens"] = int(inputs["input_ids"].shape[1])
        self.info[f"{media}_grid"] = np.asarray(grid).tolist()

    def vision(self, media: str) -> None:
        pixels, grid = self.inputs.vision[media]
        tower = self.model.vision_tower
        dtype = tower.patch_embed.proj.weight.dtype
        features, deepstack = tower(mx.array(pixels).astype(dtype), mx.array(grid))
        mx.eval(features, deepstack)

    def _steps(self, input_ids, pixel_values, mask, max_tokens: int, cache=None, **kwargs):
        return generate_step(
            input_ids,
            self.model,
            pixel_values,
            mask,
            max_tokens=max_tokens,
            temperature=0.0,
            prompt_cache=cache,
            **kwargs,
        )

    def text_generation(self, max_tokens: int):
        ids = mx.array(self.inputs.prompt[None])
        with Clock() as clock:
            tokens, times = [], []
            for token, _ in self._steps(ids, None, None, max_tokens):
                times.append(clock.lap())
                tokens.append(int(token))
        return times[0], times, tokens

    def image_ttft(self, image: str, preprocess: bool) -> float:
        if preprocess:
            return seconds_to_first(
                lambda: stream_generate(
                    self.model,
                    self.processor,
                    self._prompt(IMAGE_QUESTION, num_images=1),
                    image=[self.inputs.images[image]],
                    max_tokens=2,
                    temperature=0.0,
                )
            )
        inputs = self._process(image)
        extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "pixel_values", "attention_mask")}
        return seconds_to_first(
            lambda: self._steps(
                inputs["input_ids"], inputs["pixel_values"], inputs.get("attention_mask"), 2, **extra
            )
        )

    def chat(self, image: str, max_tokens: int):
        """Turn two re-sends the whole conversation; PromptCacheState finds the cached prefix (which
        holds the image) and prefills only the rest. The image is an explicit part of the first user
        message: with a plain string there, mlx-vlm's template puts the image in the last message."""
        state = PromptCacheState()
        picture = self.inputs.images[image]
        first_message = {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": IMAGE_QUESTION}],
        }
        seconds, answer, cached = [], "", 0
        for turn in range(2):
            messages = [first_message]
            if turn:
                messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": FOLLOW_UP}]
            with Clock() as clock:
                prompt = self._prompt(messages, num_images=1)
                responses = stream_generate(
                    self.model,
                    self.processor,
                    prompt,
                    image=[picture],
                    max_tokens=max_tokens,
                    temperature=0.0,
                    prompt_cache_state=state,
                )
                first = next(responses)
            seconds.append(clock.seconds)
            pieces = [first.text] + [r.text for r in responses]
            answer, cached = "".join(pieces), first.cached_tokens
            total = first.prompt_tokens
        return seconds[0], seconds[1], total - cached

    def peak_memory(self, image: str | None, max_tokens: int) -> float:
        self.drain()
        mlx_memory(reset=True)
        if image is None:
            self.text_generation(max_tokens)
        else:
            prompt = self._prompt(IMAGE_QUESTION, num_images=1)
            for _ in stream_generate(
                self.model,
                self.processor,
                prompt,
                image=[self.inputs.images[image]],
                max_tokens=max_tokens,
                temperature=0.0,
            ):
                pass
        self.drain()
        return mlx_memory()

    def decode_ops(self):
        cache = vlm_cache.make_prompt_cache(self.model.language_model)
        ids = mx.array(self.inputs.prompt[None])
        tokens = [int(t) for t, _ in self._steps(ids, None, None, 1, cache=cache)]
        self.drain()
        # generate_step ran one more step after the yielded token; continue from there as it would.
        token = mx.array([[tokens[-1]]])

        def step():
            fresh = fresh_caches(cache)
            return self.model.language_model(token, cache=fresh, logits_to_keep=1).logits[:, -1, :]

        return decode_step_ops(step)

    def bytes_per_token(self) -> int:
        text_config = self.model.config.text_config
        return weight_bytes_per_token(
            self.model,
            ("language_model",),
            "language_model.model.embed_tokens",
            text_config.tie_word_embeddings,
            text_config,
        )
