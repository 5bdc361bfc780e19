"""transformers' Qwen3VLForConditionalGeneration on the same checkpoint, in PyTorch (CPU, or CUDA when
there is one), in the same dtype; not quantized (it has no MLX quantization: skipped when --quantize).

Its processor is `AutoProcessor` where torchvision is installed. Without torchvision (this project's CPU
environment: no torchvision build matches the pinned CPU torch) images go through the PIL image
processor and the same placeholder expansion Qwen3VLProcessor does, and the video figure is left out.
Timings come from `generate` itself: a logits processor records when each token's logits are ready."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from inputs import IMAGE_QUESTION, VIDEO_FRAMES, VIDEO_QUESTION
from transformers import (
    AutoTokenizer,
    LogitsProcessor,
    LogitsProcessorList,
    Qwen3VLForConditionalGeneration,
)

from .base import System as Base
from .base import Unsupported

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
IMAGE_PAD, VIDEO_PAD = 151655, 151656


class _Stamps(LogitsProcessor):
    def __init__(self, start: float):
        self.start, self.times = start, []

    def __call__(self, input_ids, scores):
        _sync()
        self.times.append(time.perf_counter() - self.start)
        return scores


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class System(Base):
    name = "transformers"
    groups = ("load", "preprocess", "vision", "text", "ttft", "memory")

    def __init__(self, spec, inputs):
        super().__init__(spec, inputs)
        if self.bits:
            raise SystemExit("transformers: no MLX quantization; run it without --quantize")
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.info["device"] = self.device
        self.info["torch_threads"] = torch.get_num_threads()

    def load(self) -> None:
        path = Path(self.spec["checkpoint"])
        self.model = None
        self.model = Qwen3VLForConditionalGeneration.from_pretrained(path, dtype=DTYPES[self.dtype])
        self.model = self.model.to(self.device).eval()
        self.processor = self._load_processor(path)
        _sync()

    def _load_processor(self, path: Path):
        try:
            from transformers import AutoProcessor

            processor = AutoProcessor.from_pretrained(path)
            self.info["processor"] = type(processor).__name__
            return processor
        except ImportError:  # no torchvision: the PIL image processor, images only
            from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

            self.image_processor = Qwen2VLImageProcessorPil(
                **json.loads((path / "preprocessor_config.json").read_text())
            )
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.chat_template = json.loads((path / "chat_template.json").read_text())["chat_template"]
            self.info["processor"] = "Qwen2VLImageProcessorPil + tokenizer (no torchvision)"
            return None

    def drain(self) -> None:
        _sync()

    def _messages(self, kind: str, question: str) -> list[dict]:
        return [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": question}]}]

    def _process(self, media: str) -> dict:
        if self.processor is not None:
            if media == "video16":
                messages = self._messages("video", VIDEO_QUESTION)
                text = self.processor.apply_chat_template(
                    messages, add_generation_prompt=True, tokenize=False
                )
                inputs = self.processor(
                    text=[text],
                    videos=[self.inputs.video],
                    num_frames=VIDEO_FRAMES,
                    return_tensors="pt",
                )
            else:
                messages = self._messages("image", IMAGE_QUESTION)
                text = self.processor.apply_chat_template(
                    messages, add_generation_prompt=True, tokenize=False
                )
                inputs = self.processor(text=[text], images=[self.inputs.images[media]], return_tensors="pt")
            return dict(inputs)
        if media == "video16":
            raise Unsupported
        pixels = self.image_processor(images=[self.inputs.images[media]], return_tensors="pt")
        text = self.tokenizer.apply_chat_template(
            self._messages("image", IMAGE_QUESTION),
            add_generation_prompt=True,
            tokenize=False,
            chat_template=self.chat_template,
        )
        tokens = int(pixels["image_grid_thw"][0].prod()) // self.image_processor.merge_size**2
        text = text.replace("<|image_pad|>", "<|image_pad|>" * tokens)
        inputs = dict(self.tokenizer([text], return_tensors="pt"))
        inputs.update(pixels)
        ids = inputs["input_ids"]
        inputs["mm_token_type_ids"] = (ids == IMAGE_PAD).long() + 2 * (ids == VIDEO_PAD).long()
        return inputs

    def preprocess(self, media: str) -> None:
        inputs = self._process(media)
        grid = inputs.get("image_grid_thw", inputs.get("video_grid_thw"))
        self.info[f"{media}_prompt_tokens"] = int(inputs["input_ids"].shape[1])
        self.info[f"{media}_grid"] = grid.tolist()

    def vision(self, media: str) -> None:
        pixels, grid = self.inputs.vision[media]
        visual = self.model.model.visual
        with torch.no_grad():
            pixels = torch.from_numpy(pixels).to(self.device, visual.dtype)
            visual(pixels, grid_thw=torch.from_numpy(grid).to(self.device))
        _sync()

    def _generate(self, inputs: dict, max_tokens: int, start: float) -> tuple[list[float], list[int]]:
        stamps = _Stamps(start)
        inputs = {k: v.to(self.device) if hasattr(v, "to") else v for k, v in inputs.items()}
        with torch.no_grad():
            out = self.model.generate(
                **inputs,
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                logits_processor=LogitsProcessorList([stamps]),
            )
        new = out[0, inputs["input_ids"].shape[1] :].tolist()
        return stamps.times, new

    def text_generation(self, max_tokens: int):
        ids = torch.from_numpy(self.inputs.prompt.astype("int64"))[None]
        start = time.perf_counter()
        times, tokens = self._generate(
            {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, max_tokens, start
        )
        return times[0], times, tokens

    def image_ttft(self, image: str, preprocess: bool) -> float:
        if preprocess:
            start = time.perf_counter()
            times, _ = self._generate(self._process(image), 1, start)
            return times[0]
        inputs = self._process(image)
        times, _ = self._generate(inputs, 1, time.perf_counter())
        return times[0]

    def peak_memory(self, image: str | None, max_tokens: int) -> float:
        if self.device != "cuda":
            raise Unsupported  # CPU: only the process's max RSS (info.max_rss_gb) is known
        torch.cuda.reset_peak_memory_stats()
        if image is None:
            self.text_generation(max_tokens)
        else:
            self._generate(self._process(image), max_tokens, time.perf_counter())
        return torch.cuda.max_memory_allocated() / 1e9

    def bytes_per_token(self) -> int:
        total = 0
        tied = self.model.config.tie_word_embeddings
        for name, p in self.model.named_parameters():
            if "visual" in name:
                continue
            if "embed_tokens" in name and not tied:
                total += p.element_size() * p.shape[1]
            else:
                total += p.numel() * p.element_size()
        return total
