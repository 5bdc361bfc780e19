"""Random-weight Qwen3-VL checkpoints in the published layout, made with transformers."""

from __future__ import annotations

import copy
import gzip
import json
import shutil
from functools import cache
from pathlib import Path

import torch
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

DATA = Path(__file__).parent / "data" / "qwen3-vl-4b-instruct"
THINKING_TEMPLATE = Path(__file__).parent / "data" / "qwen3-vl-thinking" / "chat_template.json"

# Overrides of the published 4B config. Head dims stay at the real 128 (text) and 64 (vision) so the
# exact rope tables are exercised; widths are small so the whole suite runs in minutes on a CPU.
TINY = {
    "text_config": {
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "initializer_range": 0.1,
    },
    "vision_config": {
        "depth": 4,
        "hidden_size": 128,
        "num_heads": 2,
        "intermediate_size": 256,
        "out_hidden_size": 128,
        "deepstack_visual_indexes": [0, 2, 3],
        "initializer_range": 0.1,
    },
}

# The real 4B widths (text 2560 with 32/8 heads of 128, vision 1024 with 16 heads, 2560 out) with few
# layers: catches what the tiny widths cannot (head_dim != hidden / heads, GQA group 4, large merger).
FULL_WIDTH_4B = {
    "text_config": {"num_hidden_layers": 3, "initializer_range": 0.02},
    "vision_config": {"depth": 4, "deepstack_visual_indexes": [1, 2, 3], "initializer_range": 0.02},
}


def published_config() -> dict:
    return json.loads((DATA / "config.json").read_text())


def config_with(overrides: dict) -> dict:
    config = copy.deepcopy(published_config())
    for section, values in overrides.items():
        if isinstance(values, dict):
            config[section].update(values)
        else:
            config[section] = values
    return config


def copy_model_files(target: Path) -> None:
    """Everything of the published directory except config and weights: tokenizer, template, preprocessing."""
    target.mkdir(parents=True, exist_ok=True)
    for file in DATA.iterdir():
        if file.name in ("config.json", "README.md"):
            continue
        if file.name == "tokenizer.json.gz":
            with gzip.open(file, "rb") as src, open(target / "tokenizer.json", "wb") as dst:
                shutil.copyfileobj(src, dst)
        else:
            shutil.copy(file, target / file.name)


def build_checkpoint(target: Path, overrides: dict, seed: int = 0, max_shard_size="5GB") -> Path:
    """Random weights (bfloat16, like the published checkpoint) saved by transformers' save_pretrained."""
    config = Qwen3VLConfig(**config_with(overrides))
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config)
    with torch.no_grad():
        # transformers initialises norms to the identity (weight 1, bias 0), which would hide any mistake in
        # how a norm applies its affine part; perturb them like trained weights are.
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    model = model.to(torch.bfloat16)
    model.save_pretrained(target, max_shard_size=max_shard_size)
    copy_model_files(target)
    return target


@cache
def reference_model(path: Path, dtype: torch.dtype = torch.float32):
    """transformers' Qwen3VLForConditionalGeneration on the same files (cached per run)."""
    model = Qwen3VLForConditionalGeneration.from_pretrained(path, dtype=dtype)
    return model.eval()
