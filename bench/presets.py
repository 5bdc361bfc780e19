"""Random-weight checkpoints for the benchmark: one preset per published size, optionally truncated to
N decoder layers and M vision blocks, built once with transformers' `save_pretrained` (bfloat16) and
cached.

The weights are random, so the speed of every figure is that of the real model at the same width; the
generated text is noise. The config.json written next to the weights is the published (transformers
4.57) layout with the preset's overrides: transformers 5 re-saves it with `rope_parameters` only, which
mlx-vlm 0.7.10 cannot read (docs/reference.md §1.3), and the real checkpoints on the hub have the 4.57 layout.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from checkpoints import TINY  # noqa: E402  (tests/checkpoints.py: the tiny test model)

CACHE_ROOT = Path(os.environ.get("MLX_QWEN3VL_BENCH_CACHE", "~/.cache/mlx-qwen3vl-bench")).expanduser()

# The vision tower of the 8B, the 32B and the 30B-A3B (docs/reference.md §1.2), each with its own merger
# width.
VISION_27X1152 = {
    "depth": 27,
    "hidden_size": 1152,
    "num_heads": 16,
    "intermediate_size": 4304,
    "deepstack_visual_indexes": [8, 16, 24],
}

# Overrides of the published 4B config.json (docs/reference.md §1.1); 2B, 8B and 32B from docs/reference.md
# §1.2, 30B-A3B from its published config.json (the README's MoE section).
PRESETS: dict[str, dict] = {
    "tiny": TINY,
    "2b": {
        "text_config": {
            "hidden_size": 2048,
            "num_hidden_layers": 28,
            "num_attention_heads": 16,
            "num_key_value_heads": 8,
            "intermediate_size": 6144,
        },
        "vision_config": {"out_hidden_size": 2048},
    },
    "4b": {},
    "8b": {
        "tie_word_embeddings": False,
        "text_config": {
            "hidden_size": 4096,
            "num_hidden_layers": 36,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "intermediate_size": 12288,
            "tie_word_embeddings": False,
        },
        "vision_config": {
            **VISION_27X1152,
            "out_hidden_size": 4096,
        },
    },
    "32b": {
        "tie_word_embeddings": False,
        "text_config": {
            "hidden_size": 5120,
            "num_hidden_layers": 64,
            "num_attention_heads": 64,
            "num_key_value_heads": 8,
            "intermediate_size": 25600,
            "tie_word_embeddings": False,
        },
        "vision_config": {
            **VISION_27X1152,
            "out_hidden_size": 5120,
        },
    },
    # Qwen/Qwen3-VL-30B-A3B-Instruct: 128 experts of width 768, 8 per token, in every layer; the 8B's
    # vision tower with a 2048-wide merger. `intermediate_size` (the dense MLP) is unused without
    # mlp_only_layers.
    "30b-a3b": {
        "model_type": "qwen3_vl_moe",
        "architectures": ["Qwen3VLMoeForConditionalGeneration"],
        "tie_word_embeddings": False,
        "text_config": {
            "model_type": "qwen3_vl_moe_text",
            "hidden_size": 2048,
            "num_hidden_layers": 48,
            "num_attention_heads": 32,
            "num_key_value_heads": 4,
            "head_dim": 128,
            "intermediate_size": 6144,
            "num_experts": 128,
            "num_experts_per_tok": 8,
            "moe_intermediate_size": 768,
            "norm_topk_prob": True,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "tie_word_embeddings": False,
        },
        "vision_config": {
            "model_type": "qwen3_vl_moe",
            **VISION_27X1152,
            "out_hidden_size": 2048,
        },
    },
}


def _merged(preset: str) -> dict:
    """The preset's full config.json (published layout)."""
    from checkpoints import config_with

    overrides = copy.deepcopy(PRESETS[preset])
    top = {k: v for k, v in overrides.items() if not isinstance(v, dict)}
    config = config_with({k: v for k, v in overrides.items() if isinstance(v, dict)})
    config.update(top)
    return config


def deepstack_taps(published: list[int], depth: int, blocks: int, layers: int) -> list[int]:
    """DeepStack taps for a tower cut to `blocks` blocks: the published taps scaled to the new depth
    (distinct, in range), at most one per decoder layer (tap j is added after layer j)."""
    if blocks == depth:
        taps = list(published)
    else:
        taps = sorted({min(blocks - 1, i * blocks // depth) for i in published})
    return taps[:layers]


def truncated_config(preset: str, layers: int | None, blocks: int | None) -> dict:
    """The preset's config.json with only `layers` decoder layers and `blocks` vision blocks kept."""
    config = _merged(preset)
    text, vision = config["text_config"], config["vision_config"]
    depth = vision["depth"]
    layers = layers or text["num_hidden_layers"]
    blocks = blocks or depth
    if not 1 <= layers <= text["num_hidden_layers"] or not 1 <= blocks <= depth:
        raise SystemExit(
            f"--layers must be in 1..{text['num_hidden_layers']} and --vision-blocks in 1..{depth} "
            f"for {preset}"
        )
    vision["deepstack_visual_indexes"] = deepstack_taps(
        vision["deepstack_visual_indexes"], depth, blocks, layers
    )
    text["num_hidden_layers"] = layers
    vision["depth"] = blocks
    return config


def checkpoint_name(preset: str, layers: int | None, blocks: int | None) -> str:
    config = truncated_config(preset, layers, blocks)
    return f"{preset}-L{config['text_config']['num_hidden_layers']}-V{config['vision_config']['depth']}"


def build(target: Path, config: dict, seed: int = 0) -> Path:
    """transformers' random initialisation (norms perturbed, as in the tests), saved in bfloat16 with the
    real tokenizer and preprocessing files; then the published-layout config.json."""
    from checkpoints import build_checkpoint

    sections = {k: v for k, v in config.items() if k in ("text_config", "vision_config")}
    top = {k: v for k, v in config.items() if k not in sections}
    # A copy: transformers' config classes pop keys (rope_scaling's rope_theta) from the dicts they get.
    build_checkpoint(target, copy.deepcopy({**sections, **top}), seed=seed)
    if config.get("model_type") == "qwen3_vl_moe":
        hub_expert_layout_files(target)
    (target / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return target


def hub_expert_layout(tensors: dict) -> dict:
    """MoE expert tensors in the published files' orientation, [E, hidden, 2 * I] and [E, I, hidden]:
    transformers 5 saves them transposed ([E, out, in]), which mlx-vlm 0.7.10's sanitize misreads (it
    splits and transposes the hub's layout). Our loader reads both (mlx_qwen3vl/moe.py)."""
    suffixes = (".experts.gate_up_proj", ".experts.down_proj")
    return {k: v.transpose(1, 2).contiguous() if k.endswith(suffixes) else v for k, v in tensors.items()}


def hub_expert_layout_files(target: Path) -> None:
    from safetensors.torch import load_file, save_file

    for file in sorted(target.glob("*.safetensors")):
        save_file(hub_expert_layout(load_file(str(file))), str(file), metadata={"format": "pt"})


def fast_build(target: Path, config: dict, seed: int = 0) -> Path:
    """The same files without transformers' initialisation (minutes for a full model on a busy CPU):
    the tensor names and shapes of the transformers model (built on the meta device), filled with
    normal(0, initializer_range) in bfloat16, biases 0, norm weights 1 + normal(0, 0.1), and written with
    safetensors as one file. For the GPU machine, where every minute counts."""
    import torch
    from checkpoints import MODEL_CLASSES, copy_model_files
    from safetensors.torch import save_file

    config_class, model_class = MODEL_CLASSES[config.get("model_type", "qwen3_vl")]
    with torch.device("meta"):
        model = model_class(config_class(**copy.deepcopy(config)))
    std = config["text_config"].get("initializer_range", 0.02)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, param in model.state_dict().items():
        if name == "lm_head.weight" and config.get("tie_word_embeddings", True):
            continue
        if "norm" in name:
            base = 1.0 if name.endswith("weight") else 0.0
            value = base + 0.1 * torch.randn(param.shape, generator=generator)
        elif name.endswith("bias"):
            value = torch.zeros(param.shape)
        else:
            value = std * torch.randn(param.shape, generator=generator, dtype=torch.bfloat16)
        tensors[name] = value.to(torch.bfloat16).contiguous()
    target.mkdir(parents=True, exist_ok=True)
    save_file(hub_expert_layout(tensors), str(target / "model.safetensors"), metadata={"format": "pt"})
    copy_model_files(target)
    (target / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return target


def checkpoint(
    preset: str,
    layers: int | None,
    blocks: int | None,
    root: Path = CACHE_ROOT,
    rebuild: bool = False,
    fast: bool = False,
) -> Path:
    """The cached checkpoint directory for this preset and truncation, built if missing."""
    config = truncated_config(preset, layers, blocks)
    target = root / checkpoint_name(preset, layers, blocks)
    marker = target / "bench-config.json"
    if not rebuild and marker.exists() and json.loads(marker.read_text()) == config:
        return target
    if target.exists():
        for file in target.iterdir():
            file.unlink()
    (fast_build if fast else build)(target, config)
    marker.write_text(json.dumps(config, indent=2) + "\n")
    return target


def main() -> None:
    """`python bench/presets.py PRESET LAYERS BLOCKS [rebuild] [fast]`: build (or find) a checkpoint
    (0 keeps all layers or blocks), print its path."""
    preset, layers, blocks = sys.argv[1], int(sys.argv[2]) or None, int(sys.argv[3]) or None
    flags = sys.argv[4:]
    print(checkpoint(preset, layers, blocks, rebuild="rebuild" in flags, fast="fast" in flags))


if __name__ == "__main__":
    main()
