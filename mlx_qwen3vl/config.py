"""Model configuration, read from a model directory's config.json (docs/reference.md §1.1-§1.3).

Both layouts of the text rope settings are accepted: transformers 4.57 files carry `rope_theta` plus a
`rope_scaling` dict, files re-saved by transformers 5 carry a single `rope_parameters` dict.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

from .errors import Qwen3VLError
from .file_values import ANY_NUMBER, NON_NEGATIVE, check_value, checked_fields

CONFIG_FILE = "config.json"


def _from_known_keys(cls, params: dict[str, Any], section: str):
    """Build a dataclass from a config dict, ignoring keys the model does not use, each value checked
    against the field's type and range (`file_values.py`). `section`: where the dict is in config.json
    ("" for its top level)."""
    known = inspect.signature(cls).parameters
    missing = [k for k, p in known.items() if p.default is inspect.Parameter.empty and k not in params]
    if missing:
        raise Qwen3VLError(f"config.json is incomplete: {section or CONFIG_FILE} lacks {', '.join(missing)}")
    checked = checked_fields(cls, params, CONFIG_FILE, section)
    return cls(**{k: v for k, v in checked.items() if k in known})


def _section(params: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    """A nested object of config.json (null or absent: empty)."""
    value = params.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise Qwen3VLError(f"config.json: {where}.{key} is {value!r:.40}, must be an object")
    return value


# transformers' activation names that the vision MLP may use: True for the tanh approximation.
VISION_ACTIVATIONS = {"gelu_pytorch_tanh": True, "gelu_new": True, "gelu": False}


@dataclass
class VisionConfig:
    depth: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    out_hidden_size: int
    deepstack_visual_indexes: list[int] = field(default_factory=list, metadata=NON_NEGATIVE)
    hidden_act: str = "gelu_pytorch_tanh"
    in_channels: int = 3
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    num_position_embeddings: int = 2304
    # Not in the published files: transformers' default for the axial 2-D rope (docs/reference.md §1.3).
    rope_theta: float = 10000.0

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> VisionConfig:
        params = dict(params)
        rope = _section(params, "rope_parameters", "vision_config")
        if "rope_theta" in rope:
            params["rope_theta"] = rope["rope_theta"]
        config = _from_known_keys(cls, params, "vision_config")
        if config.hidden_size % config.num_heads:
            raise Qwen3VLError(
                f"config.json: vision_config.hidden_size {config.hidden_size} is not a multiple of "
                f"num_heads {config.num_heads}"
            )
        if config.hidden_act not in VISION_ACTIVATIONS:
            raise Qwen3VLError(f"config.json: vision hidden_act {config.hidden_act!r} is not supported")
        if any(not 0 <= i < config.depth for i in config.deepstack_visual_indexes):
            raise Qwen3VLError(
                f"config.json: deepstack_visual_indexes {config.deepstack_visual_indexes} "
                f"outside the {config.depth} vision blocks"
            )
        return config

    @property
    def head_dim(self) -> int:
        # The vision config has no head_dim key; transformers derives it the same way.
        return self.hidden_size // self.num_heads


@dataclass
class YarnScaling:
    """YaRN's settings (rope_type "yarn"), the way Qwen extends Qwen3-VL's context past the 256K it was
    trained on (to 1M). transformers' `_compute_yarn_parameters` reads the same keys with the same
    defaults; rope.py builds the frequency table and attention factor from them."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = field(default=None, metadata=ANY_NUMBER)
    mscale_all_dim: float | None = field(default=None, metadata=ANY_NUMBER)
    truncate: bool = True

    @classmethod
    def from_dict(cls, rope: dict[str, Any], text: dict[str, Any], section: str) -> YarnScaling:
        """From the merged rope settings and the rest of text_config. As in transformers: a top-level
        original_max_position_embeddings wins, else the rope's own, else max_position_embeddings; a
        missing factor is max_position_embeddings over the original length; beta 0 or None is the default.
        `section`: where `rope` is in config.json, for errors."""
        rope = {k: v for k, v in rope.items() if v is not None}
        max_positions = text.get("max_position_embeddings", 262144)
        name = "original_max_position_embeddings"
        if text.get(name):
            original = check_value(text[name], int, CONFIG_FILE, f"text_config.{name}")
        else:
            original = check_value(rope.get(name, max_positions), int, CONFIG_FILE, f"{section}.{name}")
        factor = rope.get("factor", max_positions / original)
        if not isinstance(factor, (int, float)) or isinstance(factor, bool) or factor < 1:
            raise Qwen3VLError(f"config.json: yarn factor {factor!r} must be a number >= 1")
        optional = ("attention_factor", "mscale", "mscale_all_dim", "truncate")
        settings = {k: rope[k] for k in optional if k in rope}
        for beta in ("beta_fast", "beta_slow"):
            if rope.get(beta):
                settings[beta] = rope[beta]
        settings = checked_fields(cls, settings, CONFIG_FILE, section)
        return cls(float(factor), original, **settings)


@dataclass
class MoeConfig:
    """The sparse MLP of Qwen3-VL-MoE (model_type "qwen3_vl_moe": 30B-A3B, 235B-A22B): a router picks
    num_experts_per_tok of num_experts small MLPs per token. Layers in mlp_only_layers, and all but every
    decoder_sparse_step-th layer, keep a dense MLP of intermediate_size (transformers'
    Qwen3VLMoeTextDecoderLayer). The router always renormalises its top-k weights: transformers'
    Qwen3-VL-MoE router reads no norm_topk_prob (unlike Qwen3-MoE's), and neither does this one."""

    num_experts: int = field(metadata=NON_NEGATIVE)
    num_experts_per_tok: int
    moe_intermediate_size: int
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list, metadata=NON_NEGATIVE)

    @classmethod
    def from_dict(cls, text: dict[str, Any]) -> MoeConfig:
        params = dict(text)
        # transformers 5's save_pretrained writes num_experts under its attribute-map name.
        if "num_local_experts" in params:
            params.setdefault("num_experts", params["num_local_experts"])
        if params.get("mlp_only_layers") is None:  # null means none
            params["mlp_only_layers"] = []
        config = _from_known_keys(cls, params, "text_config")
        if config.num_experts > 0 and not 1 <= config.num_experts_per_tok <= config.num_experts:
            raise Qwen3VLError(
                f"config.json: num_experts_per_tok {config.num_experts_per_tok} must be between 1 and "
                f"num_experts ({config.num_experts})"
            )
        return config

    def is_sparse(self, layer: int) -> bool:
        """Whether decoder layer `layer` (from 0) has the experts rather than the dense MLP."""
        return (
            self.num_experts > 0
            and layer not in self.mlp_only_layers
            and (layer + 1) % self.decoder_sparse_step == 0
        )


@dataclass
class TextConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rope_theta: float
    mrope_section: list[int] = field(metadata=NON_NEGATIVE)
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 262144
    hidden_act: str = "silu"
    attention_bias: bool = False
    # The rope's context extension (rope_type "yarn"); None: the rope as trained (rope_type "default").
    yarn: YarnScaling | None = None
    # The experts of a MoE model (model_type "qwen3_vl_moe"); None: every layer's MLP is dense.
    moe: MoeConfig | None = None

    @property
    def context_length(self) -> int:
        """The longest sequence (prompt and answer) the model takes: max_position_embeddings, or with YaRN
        the extended window (factor x the trained length) when the file did not raise
        max_position_embeddings itself (Qwen's recipe for 1M tokens raises both)."""
        if self.yarn is None:
            return self.max_position_embeddings
        extended = int(self.yarn.factor * self.yarn.original_max_position_embeddings)
        return max(self.max_position_embeddings, extended)

    @classmethod
    def from_dict(cls, params: dict[str, Any], sparse: bool = False) -> TextConfig:
        """From text_config; `sparse`: a MoE model's, whose expert settings it also reads."""
        # Checked first: the sizes below are computed from the file's values.
        params = checked_fields(cls, params, CONFIG_FILE, "text_config")
        if sparse:
            params["moe"] = MoeConfig.from_dict(params)
        # 5.x layout: everything in rope_parameters; 4.57 layout: rope_theta + rope_scaling.
        rope = dict(_section(params, "rope_scaling", "text_config"))
        rope.update(_section(params, "rope_parameters", "text_config"))
        where = "text_config." + ("rope_parameters" if params.get("rope_parameters") else "rope_scaling")
        theta = rope.get("rope_theta", params.get("rope_theta"))
        if theta is None:
            raise Qwen3VLError(
                "config.json: text_config has neither rope_theta nor rope_parameters.rope_theta"
            )
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type == "yarn":
            params["yarn"] = YarnScaling.from_dict(rope, params, where)
        elif rope_type != "default":
            raise Qwen3VLError(
                f"config.json: rope_type {rope_type!r} is not supported (Qwen3-VL uses 'default', "
                "or 'yarn' to extend its context)"
            )
        if not rope.get("mrope_interleaved", True):
            raise Qwen3VLError(
                "config.json: non-interleaved MRoPE (Qwen2-VL style) is not supported; this is not Qwen3-VL"
            )
        params["rope_theta"] = check_value(theta, float, CONFIG_FILE, f"{where}.rope_theta")
        sections = rope.get("mrope_section", [24, 20, 20])
        params["mrope_section"] = check_value(
            sections, list[int], CONFIG_FILE, f"{where}.mrope_section", ">= 0"
        )
        if "num_attention_heads" in params:
            params.setdefault("num_key_value_heads", params["num_attention_heads"])
            if "hidden_size" in params:
                params.setdefault("head_dim", params["hidden_size"] // params["num_attention_heads"])
        config = _from_known_keys(cls, params, "text_config")
        if config.num_attention_heads % config.num_key_value_heads:
            raise Qwen3VLError(
                f"config.json: text_config.num_attention_heads {config.num_attention_heads} is not a "
                f"multiple of num_key_value_heads {config.num_key_value_heads}"
            )
        if sum(config.mrope_section) * 2 != config.head_dim:
            raise Qwen3VLError(
                f"config.json: mrope_section {config.mrope_section} does not cover head_dim {config.head_dim}"
            )
        if config.attention_bias:
            raise Qwen3VLError("config.json: attention_bias=true is not a Qwen3-VL configuration")
        return config


SUPPORTED_MODEL_TYPE = "qwen3_vl"
# Qwen3-VL-MoE: the same model with experts in the decoder's MLPs (MoeConfig).
MOE_MODEL_TYPE = "qwen3_vl_moe"


@dataclass
class ModelConfig:
    text_config: TextConfig
    vision_config: VisionConfig
    image_token_id: int = field(default=151655, metadata=NON_NEGATIVE)
    video_token_id: int = field(default=151656, metadata=NON_NEGATIVE)
    vision_start_token_id: int = field(default=151652, metadata=NON_NEGATIVE)
    vision_end_token_id: int = field(default=151653, metadata=NON_NEGATIVE)
    tie_word_embeddings: bool = False
    model_type: str = SUPPORTED_MODEL_TYPE

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> ModelConfig:
        model_type = params.get("model_type")
        if model_type not in (SUPPORTED_MODEL_TYPE, MOE_MODEL_TYPE):
            raise Qwen3VLError(
                f"config.json: model_type {model_type!r} is not Qwen3-VL (expected {SUPPORTED_MODEL_TYPE!r} "
                f"or {MOE_MODEL_TYPE!r})"
            )
        for key in ("text_config", "vision_config"):
            if not isinstance(params.get(key), dict):
                raise Qwen3VLError(f"config.json: missing the {key} section")
        params = dict(params)
        text = params["text_config"]
        # transformers ties lm_head by the top-level flag; older files repeat it in text_config.
        params.setdefault("tie_word_embeddings", text.get("tie_word_embeddings", False))
        params["text_config"] = TextConfig.from_dict(text, sparse=model_type == MOE_MODEL_TYPE)
        params["vision_config"] = VisionConfig.from_dict(params["vision_config"])
        return _from_known_keys(cls, params, "")
