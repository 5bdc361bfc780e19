"""Random-weight Qwen3-VL checkpoints in the published layout, made with transformers."""

from __future__ import annotations

import copy
import gzip
import json
import shutil
from functools import cache
from pathlib import Path

import numpy as np
import torch
from prompts import IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START
from transformers import (
    GenerationConfig,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
)

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

# The other dense models' real widths over the published 4B config, with few layers. Their published
# config.json files (Qwen/Qwen3-VL-2B/-8B/-32B-Instruct) could not be read here (no hub access, and none
# was found vendored verbatim in a repository), so the widths are those that configs derived from them repeat:
# - 32B: huggingface.co/quanliang/F1/config.json (a Qwen3-VL-32B re-saved by transformers 5.0, with
#   tie_word_embeddings false) and the 32B text-encoder config shipped in a MiniMax-H3 port;
# - 8B: the vision tower of mlx-community/chandra-3bit (base Qwen/Qwen3-VL-8B-Instruct) and of NeMo
#   Megatron-Bridge's Qwen3VLTransformerConfig (out 4096), the decoder of Qwen3-8B (untied);
# - 2B: the decoder of Qwen3-1.7B (tied), the 4B's vision tower with a 2048-wide merger (sgl-jax's
#   Qwen3VLVisionConfig defaults).
# They agree with the table of docs/reference.md §1.2 (../shared/reference/SPEC.md), taken from secondary
# copies too. Published depths, not used here: 2B 28 layers / 24 blocks, 8B 36 / 27, 32B 64 / 27; vision taps
# [5, 11, 17] (2B) and [8, 16, 24] (8B, 32B). Rope, norms, patching and vocabulary are the 4B's.
# The 8B and 32B vision towers are 1152 wide with 16 heads: head_dim 72.
_VISION_1152 = {"hidden_size": 1152, "num_heads": 16, "intermediate_size": 4304}
FULL_WIDTH_2B = {
    "tie_word_embeddings": True,
    "text_config": {
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "tie_word_embeddings": True,
        "num_hidden_layers": 2,
        "initializer_range": 0.02,
    },
    "vision_config": {
        "out_hidden_size": 2048,
        "depth": 3,
        "deepstack_visual_indexes": [0, 1, 2],
        "initializer_range": 0.02,
    },
}
FULL_WIDTH_8B = {
    "tie_word_embeddings": False,
    "text_config": {
        "hidden_size": 4096,
        "intermediate_size": 12288,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "tie_word_embeddings": False,
        "num_hidden_layers": 2,
        "initializer_range": 0.02,
    },
    "vision_config": {
        **_VISION_1152,
        "out_hidden_size": 4096,
        "depth": 3,
        "deepstack_visual_indexes": [0, 1, 2],
        "initializer_range": 0.02,
    },
}
FULL_WIDTH_32B = {
    "tie_word_embeddings": False,
    "text_config": {
        "hidden_size": 5120,
        "intermediate_size": 25600,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "tie_word_embeddings": False,
        "num_hidden_layers": 1,
        "initializer_range": 0.02,
    },
    "vision_config": {
        **_VISION_1152,
        "out_hidden_size": 5120,
        "depth": 3,
        "deepstack_visual_indexes": [0, 1, 2],
        "initializer_range": 0.02,
    },
}


def with_vocabulary(overrides: dict, vocab_size: int) -> dict:
    """`overrides` with a vocabulary of `vocab_size` tokens, whose last four are the vision markers (as
    `test_full_width.compact_vocabulary` renumbers a prompt): the published 151936 rows would make the
    embedding and lm_head most of the weights and work of a few decoder layers. Widths stay."""
    start, end, image, video = range(vocab_size - 4, vocab_size)
    return {
        **overrides,
        "vision_start_token_id": start,
        "vision_end_token_id": end,
        "image_token_id": image,
        "video_token_id": video,
        "text_config": {**overrides["text_config"], "vocab_size": vocab_size},
    }


def compact_ids(ids: np.ndarray, vocab_size: int) -> np.ndarray:
    """Token ids of the published vocabulary in a `vocab_size`-token one: the vision markers as
    `with_vocabulary` numbers them, every other token folded into the rest (the layers do not care which
    tokens they embed)."""
    markers = (VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)
    if vocab_size > max(markers):  # the published vocabulary
        return ids
    compact = ids % (vocab_size - len(markers))
    for offset, marker in enumerate(markers):
        compact = np.where(ids == marker, vocab_size - len(markers) + offset, compact)
    return compact


# TINY as Qwen3-VL-MoE: 8 experts, 2 per token, every layer sparse but layer 1 (mlp_only_layers), and an
# untied lm_head like 30B-A3B. The expert width 192 keeps the fused gate_up tensor non-square (2 * 192 !=
# 128), so its two orientations (moe.py) differ, and is a multiple of the quantization group size.
TINY_MOE = {
    "model_type": "qwen3_vl_moe",
    "tie_word_embeddings": False,
    "text_config": {
        **TINY["text_config"],
        "model_type": "qwen3_vl_moe_text",
        "tie_word_embeddings": False,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 192,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [1],
    },
    "vision_config": {**TINY["vision_config"], "model_type": "qwen3_vl_moe_vision"},
}

# transformers' classes for each model_type a test checkpoint may have.
MODEL_CLASSES = {
    "qwen3_vl": (Qwen3VLConfig, Qwen3VLForConditionalGeneration),
    "qwen3_vl_moe": (Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration),
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
    params = config_with(overrides)
    config_class, model_class = MODEL_CLASSES[params["model_type"]]
    config = config_class(**params)
    torch.manual_seed(seed)
    model = model_class(config)
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
    """transformers' Qwen3VLForConditionalGeneration (or its MoE class) on the same files (cached per run)."""
    model_type = json.loads((path / "config.json").read_text())["model_type"]
    model = MODEL_CLASSES[model_type][1].from_pretrained(path, dtype=dtype)
    return model.eval()


def reference_greedy(reference, inputs: dict, steps: int) -> tuple[list[int], np.ndarray]:
    """transformers' greedy `generate` of `steps` tokens (no stop at the end of a turn) from its model
    arguments (`prompts.torch_inputs`): the tokens and the logits each was chosen from."""
    config = GenerationConfig(do_sample=False, max_new_tokens=steps, eos_token_id=None, pad_token_id=151643)
    with torch.no_grad():
        out = reference.generate(
            **inputs, generation_config=config, return_dict_in_generate=True, output_logits=True
        )
    tokens = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
    return tokens, np.stack([step[0].numpy() for step in out.logits])
