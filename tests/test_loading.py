"""load(): the published layout (sharded with an index, or one file), dtypes, and one clear error for
each kind of broken model directory."""

import json
import re
import shutil
import subprocess
import sys
from importlib.metadata import entry_points

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from mlx_qwen3vl import Qwen3VLError, load
from mlx_qwen3vl.cpu.widening import WideningLinear
from mlx_qwen3vl.loading import weight_files


@pytest.fixture
def model_copy(tiny_checkpoint, tmp_path):
    """A private copy of the tiny checkpoint to break."""
    target = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, target)
    return target


def test_sharded_checkpoint_loads_lazily_in_the_requested_dtype(tiny_checkpoint):
    assert len(weight_files(tiny_checkpoint)) > 1  # exercised through model.safetensors.index.json
    model, processor = load(tiny_checkpoint, dtype="bfloat16", lazy=True)
    assert model.model.language_model.embed_tokens.weight.dtype == mx.bfloat16
    assert processor.tokenizer.encode("<|image_pad|>") == [151655]
    model32, _ = load(tiny_checkpoint, dtype="float32")
    assert model32.model.visual.patch_embed.proj.weight.dtype == mx.float32


def rewrite_as_single_file(path, edit):
    """Merge the shards into one model.safetensors after `edit(weights)`."""
    weights = {}
    for file in weight_files(path):
        weights.update(mx.load(str(file)))
        file.unlink()
    (path / "model.safetensors.index.json").unlink()
    edit(weights)
    mx.save_safetensors(str(path / "model.safetensors"), weights)


def test_single_file_checkpoint_gives_the_same_model(model_copy, tiny_checkpoint):
    rewrite_as_single_file(model_copy, lambda weights: None)
    ids = np.array([[151644, 872, 198, 9707]])
    a, _ = load(model_copy, dtype="float32")
    b, _ = load(tiny_checkpoint, dtype="float32")
    np.testing.assert_array_equal(np.array(a(ids)), np.array(b(ids)))


TEXT, VISION = "model.language_model.", "model.visual."


def drop(key):
    return lambda weights: weights.pop(key)


def add(key):
    return lambda weights: weights.update({key: mx.zeros((4,))})


def reshape(key):
    return lambda weights: weights.update({key: weights[key][:-1]})


@pytest.mark.parametrize(
    "edit, message",
    [
        (drop(f"{TEXT}layers.2.self_attn.k_norm.weight"), f"missing tensor {TEXT}layers.2.self_attn.k_norm"),
        (
            drop(f"{VISION}deepstack_merger_list.1.linear_fc2.bias"),
            f"missing tensor {VISION}deepstack_merger_list",
        ),
        (add(f"{VISION}blocks.9.attn.qkv.weight"), f"unexpected tensor {VISION}blocks.9.attn.qkv.weight"),
        (reshape(f"{TEXT}layers.0.mlp.up_proj.weight"), "layers.0.mlp.up_proj.weight has shape"),
    ],
)
def test_tensors_that_do_not_fit_the_config_are_named(model_copy, edit, message):
    rewrite_as_single_file(model_copy, edit)
    with pytest.raises(Qwen3VLError, match=message):
        load(model_copy)


def test_untied_config_without_lm_head_is_refused(model_copy):
    config = json.loads((model_copy / "config.json").read_text())
    config["tie_word_embeddings"] = config["text_config"]["tie_word_embeddings"] = False
    (model_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(Qwen3VLError, match="missing tensor lm_head.weight"):
        load(model_copy)


def break_directory(path, how):
    if how == "no config":
        (path / "config.json").unlink()
    elif how == "bad json":
        (path / "config.json").write_text("{not json")
    elif how == "moe":
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, "model_type": "qwen3_vl_moe"}))
    elif how == "no weights":
        for file in weight_files(path):
            file.unlink()
        (path / "model.safetensors.index.json").unlink()
    elif how == "missing shard":
        weight_files(path)[-1].unlink()
    elif how == "corrupt shard":
        weight_files(path)[0].write_bytes(b"\x00garbage" * 10)
    elif how == "no tokenizer":
        (path / "tokenizer.json").unlink()


@pytest.mark.parametrize(
    "how, message",
    [
        ("no config", "no config.json"),
        ("bad json", "config.json: not valid JSON"),
        ("moe", "config.json is incomplete: text_config lacks num_experts"),
        ("no weights", "no \\*.safetensors weight files"),
        ("missing shard", "model-00002-of-00002.safetensors listed in the index is missing"),
        ("corrupt shard", "model-00001-of-00002.safetensors: cannot read safetensors"),
        ("no tokenizer", "no tokenizer"),
    ],
)
def test_broken_model_directories_get_one_clear_error(model_copy, how, message):
    break_directory(model_copy, how)
    with pytest.raises(Qwen3VLError, match=message):
        load(model_copy)


def test_missing_directory_file_path_and_bad_dtype(tiny_checkpoint, tmp_path):
    with pytest.raises(Qwen3VLError, match="no such model directory"):
        load(tmp_path / "nowhere")
    with pytest.raises(Qwen3VLError, match="not a directory"):
        load(tiny_checkpoint / "config.json")
    with pytest.raises(Qwen3VLError, match="dtype 'int8' is not supported"):
        load(tiny_checkpoint, dtype="int8")


def test_hub_id_while_offline_and_not_cached_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(Qwen3VLError, match="is not downloaded and the hub cannot be reached") as error:
        load("Qwen/Qwen3-VL-4B-Instruct")
    # The command it names is one huggingface_hub installs (a console script), and it has that subcommand.
    command = re.search(r"run '(\S+) (\S+) Qwen/Qwen3-VL-4B-Instruct'", str(error.value))
    assert command, error.value
    scripts = [e for e in entry_points(group="console_scripts") if e.name == command[1]]
    assert scripts and scripts[0].dist.name.replace("-", "_") == "huggingface_hub"
    module, function = scripts[0].value.split(":")
    argv = [command[1], command[2], "--help"]
    run = f"import sys; sys.argv = {argv}; from {module} import {function}; {function}()"
    assert subprocess.run([sys.executable, "-c", run], capture_output=True).returncode == 0


def test_default_compute_dtype_is_chosen_per_backend(tiny_checkpoint):
    model, _ = load(tiny_checkpoint, lazy=True)
    expected = mx.bfloat16 if mx.default_device() == mx.gpu else mx.float32
    assert model.model.language_model.embed_tokens.weight.dtype == expected
    assert model.model.visual.patch_embed.proj.weight.dtype == expected  # it sets the tower's dtype


def test_vision_matrices_stay_bfloat16_under_float32_compute_and_widen_exactly(
    tiny_f32, tiny_checkpoint, prompts
):
    """A bfloat16 checkpoint's vision matrices keep bfloat16 under float32 compute (half the tower's
    memory), and are widened per call: the features are float32 and equal, bit for bit, those of the
    tower with every tensor widened at load."""
    model = tiny_f32[0]
    params = dict(tree_flatten(model.model.visual.parameters()))
    narrow = {
        f"{name}.{key}"
        for name, module in model.model.visual.named_modules()
        if isinstance(module, WideningLinear)
        for key in ("weight", "bias")
    }
    assert narrow and narrow < params.keys() and "blocks.0.attn.qkv.weight" in narrow
    assert {params[k].dtype for k in narrow} == {mx.bfloat16}
    assert {v.dtype for k, v in params.items() if k not in narrow} == {mx.float32}

    widened, _ = load(tiny_checkpoint, dtype="float32")
    widened.model.visual.update(tree_unflatten([(k, v.astype(mx.float32)) for k, v in params.items()]))
    for name in ("image", "video"):
        prompt = prompts[name]
        pixels = prompt.pixel_values if prompt.pixel_values is not None else prompt.pixel_values_videos
        grid = prompt.image_grid_thw if prompt.pixel_values is not None else prompt.video_grid_thw
        ours, reference = model.encode_vision(pixels, grid), widened.encode_vision(pixels, grid)
        pairs = zip((ours.features, *ours.deepstack), (reference.features, *reference.deepstack), strict=True)
        for a, b in pairs:
            assert a.dtype == mx.float32 and mx.array_equal(a, b).item()


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
def test_loading_holds_each_parameter_once(tiny_checkpoint, backend):
    """After load, the model's parameters are all that was added (the parts of the fused q/k/v and
    gate/up matrices are not kept beside them), and the peak while loading stays within the model plus
    one decoder layer's parts: the fused matrices are built layer by layer."""
    import gc

    gc.collect()
    mx.synchronize()
    mx.clear_cache()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    model, _ = load(tiny_checkpoint, dtype="bfloat16", backend=backend)
    params = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    layer = sum(v.nbytes for _, v in tree_flatten(model.layers[0].parameters()))
    assert "qkv_proj" in model.layers[0].self_attn
    assert mx.get_active_memory() - before <= params * 1.01
    assert mx.get_peak_memory() - before <= params + 2 * layer
