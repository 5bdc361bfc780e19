"""mlx-lm's own Qwen3 decoder (`mlx_lm.models.qwen3`) at the checkpoint's text dimensions, with the
checkpoint's decoder weights: for a text prompt Qwen3-VL's interleaved MRoPE with equal t/h/w positions
is plain rope, so this is the same computation as the VL decoder on the same token ids (the greedy tokens
are recorded to show it). Text figures only: prefill, decode, peak memory, ops per step."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
from graph import qwen3_args
from measure import Clock, decode_step_ops, fresh_caches, mlx_memory, quantize, weight_bytes_per_token
from mlx.utils import tree_unflatten
from mlx_lm.generate import generate_step, generation_stream
from mlx_lm.models import cache as lm_cache
from mlx_lm.models.qwen3 import Model

from .base import System as Base

DTYPES = {"bfloat16": mx.bfloat16, "float32": mx.float32, "float16": mx.float16}
PREFIX = "model.language_model."


class System(Base):
    name = "mlx-lm"
    groups = ("text", "memory", "ops")  # its load (text weights only) is not comparable

    def load(self) -> None:
        path = Path(self.spec["checkpoint"])
        config = json.loads((path / "config.json").read_text())
        args = qwen3_args(config)
        self.model = None
        model = Model(args)
        weights = {}
        for file in sorted(path.glob("*.safetensors")):
            for key, value in mx.load(str(file)).items():
                if key.startswith(PREFIX):
                    weights["model." + key[len(PREFIX) :]] = value
                elif key == "lm_head.weight" and not args.tie_word_embeddings:
                    weights[key] = value
        dtype = DTYPES[self.dtype]
        weights = {k: v.astype(dtype) for k, v in weights.items()}
        model.update(tree_unflatten(list(weights.items())))
        if self.bits:
            self.info["quantized_layers"] = quantize(model, self.bits, skip=())
        mx.eval(model.parameters())
        model.eval()
        self.model = model

    def drain(self) -> None:
        mx.synchronize(generation_stream)
        mx.synchronize()

    def text_generation(self, max_tokens: int, cache=None):
        ids = mx.array(self.inputs.prompt)
        with Clock() as clock:
            tokens, times = [], []
            for token, _ in generate_step(ids, self.model, max_tokens=max_tokens, prompt_cache=cache):
                times.append(clock.lap())
                tokens.append(int(token))
        return times[0], times, tokens

    def peak_memory(self, image: str | None, max_tokens: int) -> float:
        if image is not None:
            return super().peak_memory(image, max_tokens)
        self.drain()
        mlx_memory(reset=True)
        self.text_generation(max_tokens)
        self.drain()
        return mlx_memory()

    def decode_ops(self):
        cache = lm_cache.make_prompt_cache(self.model)
        _, _, tokens = self.text_generation(1, cache=cache)
        self.drain()
        token = mx.array([[tokens[-1]]])
        return decode_step_ops(lambda: self.model(token, cache=fresh_caches(cache))[:, -1, :])

    def bytes_per_token(self) -> int:
        tied = self.model.args.tie_word_embeddings
        return weight_bytes_per_token(self.model, ("model", "lm_head"), "model.embed_tokens", tied)
