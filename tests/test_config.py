"""config.json in both transformers layouts, the dense family's sizes, and what is refused."""

import copy

import pytest
from checkpoints import published_config
from mlx.utils import tree_flatten

from mlx_qwen3vl.config import ModelConfig
from mlx_qwen3vl.errors import Qwen3VLError
from mlx_qwen3vl.model import Model


def test_published_4b_config_in_the_4_57_layout():
    config = ModelConfig.from_dict(published_config())
    text, vision = config.text_config, config.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.head_dim) == (2560, 36, 128)
    assert (text.num_attention_heads, text.num_key_value_heads) == (32, 8)
    assert text.rope_theta == 5_000_000 and text.mrope_section == [24, 20, 20]
    assert (vision.depth, vision.hidden_size, vision.num_heads, vision.head_dim) == (24, 1024, 16, 64)
    assert vision.deepstack_visual_indexes == [5, 11, 17] and vision.rope_theta == 10000.0
    assert config.tie_word_embeddings and config.image_token_id == 151655


def as_transformers_5_layout(params: dict) -> dict:
    """What transformers 5 writes when it re-saves the published file (docs/reference.md §1.3)."""
    params = copy.deepcopy(params)
    text = params["text_config"]
    text["rope_parameters"] = {**text.pop("rope_scaling"), "rope_theta": text.pop("rope_theta")}
    params["vision_config"]["rope_parameters"] = {"rope_type": "axial", "rope_theta": 10000.0}
    return params


def test_transformers_5_layout_reads_the_same():
    assert ModelConfig.from_dict(as_transformers_5_layout(published_config())) == ModelConfig.from_dict(
        published_config()
    )


# docs/reference.md §1.2: the other dense sizes, as changes to the 4B file.
VISION_8B_32B = {
    "depth": 27,
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "deepstack_visual_indexes": [8, 16, 24],
}
# size: (text_config changes, vision_config changes, tied embeddings)
FAMILY = {
    "2B": (
        {"hidden_size": 2048, "num_hidden_layers": 28, "num_attention_heads": 16, "intermediate_size": 6144},
        {"out_hidden_size": 2048},
        True,
    ),
    "4B": ({}, {}, True),
    "8B": (
        {"hidden_size": 4096, "intermediate_size": 12288},
        {**VISION_8B_32B, "out_hidden_size": 4096},
        False,
    ),
    "32B": (
        {"hidden_size": 5120, "num_hidden_layers": 64, "num_attention_heads": 64, "intermediate_size": 25600},
        {**VISION_8B_32B, "out_hidden_size": 5120},
        False,
    ),
}


@pytest.mark.parametrize("size", FAMILY)
@pytest.mark.parametrize("layout", ["4.57", "5.x"])
def test_dense_family_configs_build_models_with_checkpoint_shapes(size, layout):
    text, vision, tied = FAMILY[size]
    params = published_config()
    params["text_config"].update(text)
    params["vision_config"].update(vision)
    params["tie_word_embeddings"] = params["text_config"]["tie_word_embeddings"] = tied
    if layout == "5.x":
        params = as_transformers_5_layout(params)
    config = ModelConfig.from_dict(params)
    # Parameters are lazy: building even the 32B model allocates nothing.
    shapes = {k: tuple(v.shape) for k, v in tree_flatten(Model(config).parameters())}
    H, D, out = (
        config.text_config.hidden_size,
        config.vision_config.hidden_size,
        config.vision_config.out_hidden_size,
    )
    heads = config.text_config.num_attention_heads
    assert shapes["model.language_model.layers.0.self_attn.q_proj.weight"] == (heads * 128, H)
    assert shapes["model.language_model.layers.0.self_attn.k_proj.weight"] == (8 * 128, H)
    assert shapes["model.visual.merger.linear_fc1.weight"] == (4 * D, 4 * D)
    assert shapes["model.visual.deepstack_merger_list.2.linear_fc2.weight"] == (out, 4 * D)
    assert shapes["model.visual.deepstack_merger_list.0.norm.weight"] == (4 * D,)
    assert shapes["model.visual.patch_embed.proj.weight"] == (D, 1536)
    assert ("lm_head.weight" in shapes) == (not tied)
    assert config.vision_config.head_dim == (64 if D == 1024 else 72)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "qwen3_vl_moe"}, "text_config lacks num_experts"),  # a dense config called MoE
        ({"model_type": "qwen2_5_vl"}, "not Qwen3-VL"),
        ({"model_type": None}, "not Qwen3-VL"),
        ({"text_config": None}, "missing the text_config"),
        ({"text_config": {"hidden_size": 8, "rope_theta": 1e6}}, "incomplete: text_config lacks"),
        ({"text_config": {"hidden_size": 8}}, "rope_theta"),
    ],
)
def test_other_models_and_broken_configs_are_refused(change, message):
    params = published_config()
    params.update(change)
    with pytest.raises(Qwen3VLError, match=message):
        ModelConfig.from_dict(params)


def test_non_interleaved_mrope_is_refused():
    params = published_config()
    params["text_config"]["rope_scaling"]["mrope_interleaved"] = False
    with pytest.raises(Qwen3VLError, match="non-interleaved"):
        ModelConfig.from_dict(params)


# Qwen's recipe for a context of 1M tokens (YaRN over the 256K the model was trained on).
YARN_1M = {
    "rope_type": "yarn",
    "mrope_section": [24, 20, 20],
    "mrope_interleaved": True,
    "factor": 3.0,
    "original_max_position_embeddings": 262144,
}


def with_yarn(rope_scaling: dict, **text) -> dict:
    params = published_config()
    params["text_config"].update(rope_scaling=rope_scaling, **text)
    return params


def test_yarn_is_read_in_both_layouts_and_sets_the_context():
    params = with_yarn(YARN_1M, max_position_embeddings=1_000_000)
    config = ModelConfig.from_dict(params)
    assert config == ModelConfig.from_dict(as_transformers_5_layout(params))
    yarn = config.text_config.yarn
    assert (yarn.factor, yarn.original_max_position_embeddings, yarn.beta_fast, yarn.beta_slow) == (
        3.0,
        262144,
        32.0,
        1.0,
    )
    assert config.text_config.context_length == 1_000_000
    # Without max_position_embeddings raised, the context is the extended window: factor x trained length.
    assert ModelConfig.from_dict(with_yarn(YARN_1M)).text_config.context_length == 3 * 262144
    assert ModelConfig.from_dict(published_config()).text_config.yarn is None


def test_yarn_defaults_follow_transformers():
    """No original length: max_position_embeddings (transformers' standardisation); no factor: the
    ratio of the two; beta 0 or null: the defaults 32 / 1."""
    rope = {"rope_type": "yarn", "factor": None, "beta_fast": 0, "beta_slow": None}
    yarn = ModelConfig.from_dict(with_yarn(rope)).text_config.yarn
    assert (yarn.factor, yarn.original_max_position_embeddings) == (1.0, 262144)
    assert (yarn.beta_fast, yarn.beta_slow, yarn.truncate) == (32.0, 1.0, True)
    shorter = with_yarn({**rope, "original_max_position_embeddings": 65536})
    assert ModelConfig.from_dict(shorter).text_config.yarn.factor == 4.0


@pytest.mark.parametrize(
    "rope_scaling, message",
    [
        ({"rope_type": "linear", "factor": 2.0}, "rope_type 'linear' is not supported"),
        ({"type": "dynamic", "factor": 2.0}, "rope_type 'dynamic' is not supported"),
        ({**YARN_1M, "factor": 0.5}, "yarn factor 0.5 must be a number >= 1"),
        ({**YARN_1M, "factor": "3"}, "yarn factor '3' must be a number >= 1"),
    ],
)
def test_other_rope_scalings_are_refused(rope_scaling, message):
    with pytest.raises(Qwen3VLError, match=message):
        ModelConfig.from_dict(with_yarn(rope_scaling))
