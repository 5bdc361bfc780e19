"""Convert a Qwen3-VL checkpoint into an MLX model directory, optionally quantized (MLX's affine
quantization), that `load()` reads directly.

The conversion streams: source tensors are mapped lazily (`mx.load`), each output tensor is computed and
evaluated on its own, and a shard is written and released before the next is started, so memory holds at
most one output shard plus the source tensor being converted, never a whole copy of the model.

The output directory: `model-0000i-of-0000n.safetensors` shards (at most 5 GB each) with
`model.safetensors.index.json`; config.json, the source's with mlx-lm's `quantization` block (and its
copy `quantization_config`) when quantized; generation_config.json, the tokenizer, chat template and
preprocessing files copied from the source; a short model card, README.md.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
from mlx_lm.convert import mixed_quant_predicate_builder
from tqdm import tqdm

from .auto_bits import auto_plan
from .backend import resolve_dtype
from .calibration import calibration_inputs
from .check import REPORT_FILE, Check, Report, forward_order
from .errors import Qwen3VLError
from .loading import (
    TASK_KEY,
    check_weights,
    model_directory,
    model_task,
    read_config,
    read_weights,
)
from .model import MLX_VLM_PREFIXES, Model
from .options import AUTO_RECIPE, BITS, DEFAULT_BITS, DEFAULT_GROUP_SIZE, GROUP_SIZES, RECIPES
from .processor import Processor
from .quantizable import FLOAT_MODULES, ROUTER_BITS, refusal, router_paths
from .staging import Target, check_replaceable, clean_leftovers, is_model_file, staged

MAX_SHARD_SIZE = 5 * 10**9  # bytes: "5 GB" in both the decimal and the binary reading

# The embedding is also the output projection of the tied 2B/4B models; mixed recipes keep both at
# their high bit width, as mlx-lm's recipes do for lm_head.
HIGH_PRECISION_MODULES = ("model.language_model.embed_tokens", "lm_head")
# The MoE routers stay at quantizable.ROUTER_BITS whatever the bits or recipe (tiny: experts x hidden).
# (mlx-vlm 0.7.10's converter does not consult its language model's predicate and writes the routers at
# the model's bits; load() reads either, by the packed shapes.)
# Files of the source directory that are not copied: the weights, and what the converter writes itself.
REWRITTEN_FILES = ("config.json", "model.safetensors.index.json", "*.safetensors", "README.md", REPORT_FILE)


def quantization_settings(
    bits: int | None = None,
    group_size: int | None = None,
    recipe: str | None = None,
    target_bits: float | None = None,
) -> dict:
    """The top-level `quantization` block ({group_size, bits, mode}) after checking the options (with
    the auto recipe, `bits` is the target's whole part until the recipe has chosen)."""
    if (recipe == AUTO_RECIPE) != (target_bits is not None):
        raise Qwen3VLError("--q-recipe auto and --target-bits go together: give both or neither")
    if recipe is not None:
        if recipe not in (*RECIPES, AUTO_RECIPE):
            raise Qwen3VLError(
                f"quantization recipe {recipe!r} is not supported; choose one of {', '.join(RECIPES)}, "
                f"{AUTO_RECIPE}"
            )
        if bits is not None:
            raise Qwen3VLError(f"choose either a bit width or a recipe: {recipe} sets the bits itself")
        if recipe == AUTO_RECIPE:
            if not 2 <= target_bits <= 8:
                raise Qwen3VLError(f"--target-bits {target_bits}: must be between 2 and 8")
            bits = min(BITS, key=lambda b: abs(b - target_bits))
        else:
            bits = int(recipe.split("_")[1])
    bits = DEFAULT_BITS if bits is None else bits
    group_size = DEFAULT_GROUP_SIZE if group_size is None else group_size
    if bits not in BITS:
        raise Qwen3VLError(
            f"{bits}-bit quantization is not supported; choose one of {', '.join(map(str, BITS))}"
        )
    if group_size not in GROUP_SIZES:
        raise Qwen3VLError(
            f"quantization group size {group_size} is not supported; choose one of "
            f"{', '.join(map(str, GROUP_SIZES))}"
        )
    return {"group_size": group_size, "bits": bits, "mode": "affine"}


def quantization_plan(
    model: Model,
    settings: dict,
    recipe: str | None = None,
    quantize_vision: bool = False,
    layer_bits: dict[str, int] | None = None,
) -> dict[str, dict]:
    """{module path: its quantization parameters} for every module to quantize. The vision tower stays in
    float unless quantize_vision; a layer whose input width is not a multiple of the group size stays in
    float (MLX quantizes groups along the input dimension); what `quantizable.py` protects never is.
    layer_bits: {module path: bits} a user asks for, over the rest (refused with the reason where the
    module must not be quantized so)."""
    group_size = settings["group_size"]
    mixed = recipe in RECIPES
    recipe_params = mixed_quant_predicate_builder(recipe, model, group_size) if mixed else None
    plan = {}
    routers = router_paths(model)
    modules = dict(model.named_modules())
    for path, bits in (layer_bits or {}).items():
        reason = refusal(path, bits, routers) if path in modules else None
        if reason:
            raise Qwen3VLError(f"{path} cannot be quantized at {bits} bits: {reason}")
        if not hasattr(modules.get(path), "to_quantized"):
            raise Qwen3VLError(f"{path}: no quantizable layer of that name (a module path, no .weight)")
        if bits not in BITS or modules[path].weight.shape[-1] % group_size:
            raise Qwen3VLError(f"{path}: {bits} bits with group size {group_size} does not fit this layer")
    for path, module in modules.items():
        if not hasattr(module, "to_quantized") or module.weight.shape[-1] % group_size:
            continue
        in_vision = path.startswith("model.visual.")
        if in_vision and not quantize_vision or path in FLOAT_MODULES:
            continue
        if path in routers:
            plan[path] = {**settings, "bits": ROUTER_BITS}
        elif not mixed or in_vision:
            # The recipes rank decoder layers by sensitivity; the vision tower has no such ranking.
            plan[path] = dict(settings)
        elif path in HIGH_PRECISION_MODULES:
            plan[path] = {**settings, "bits": int(recipe.split("_")[2])}
        else:
            plan[path] = recipe_params(path, module)
    for path, bits in (layer_bits or {}).items():
        plan[path] = {**settings, "bits": bits}
    return plan


def output_tensors(weights: dict[str, mx.array], plan: dict[str, dict], dtype: mx.Dtype) -> dict:
    """The output tensors, lazily: float tensors cast to dtype, the weights of planned modules quantized
    (affine: packed `.weight`, `.scales` and `.biases`, as `nn.QuantizedLinear` / `QuantizedEmbedding`
    hold them), in the order the forward pass reads them (`check.forward_order`: the check runs the model
    as they are written). mx.quantize per tensor, rather than nn.quantize on the model, so that a source
    tensor is referenced only by its outputs (and the check's run, until it has passed them) and freed
    once they are written."""
    tensors = {}
    for key in sorted(weights):
        value = weights[key]
        if mx.issubdtype(value.dtype, mx.floating):
            value = value.astype(dtype)
        module, _, name = key.rpartition(".")
        if name == "weight" and module in plan:
            params = plan[module]
            packed, scales, biases = mx.quantize(
                value, group_size=params["group_size"], bits=params["bits"], mode=params["mode"]
            )
            tensors.update({key: packed, f"{module}.scales": scales, f"{module}.biases": biases})
        else:
            tensors[key] = value
    return {key: tensors[key] for key in forward_order(tensors)}


def shard_keys(tensors: dict[str, mx.array], max_shard_size: int) -> list[list[str]]:
    """Consecutive tensors grouped into shards of at most max_shard_size bytes (a larger tensor gets a
    shard of its own). mlx-lm's make_shards does the same in whole gigabytes; bytes let the tests write
    several shards of a small model."""
    shards: list[list[str]] = []
    size = 0
    for key, value in tensors.items():
        if not shards or (shards[-1] and size + value.nbytes > max_shard_size):
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += value.nbytes
    return shards


def write_shards(
    tensors: dict[str, mx.array],
    directory: Path,
    max_shard_size: int,
    progress: bool,
    evaluated: Callable[[str], None] | None = None,
) -> None:
    """Evaluate and write the tensors shard by shard, with the index. Consumes `tensors`: each one is
    dropped from it when evaluated, so its source tensor is freed with the shard. evaluated: called with
    each key once its tensor is (the quantization check, which runs on it and on the source tensor it was
    computed from, in memory then)."""
    shards = shard_keys(tensors, max_shard_size)
    total_size = sum(v.nbytes for v in tensors.values())
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    if len(shards) == 1:
        names = ["model.safetensors"]
    weight_map = {}
    with tqdm(total=total_size, unit="B", unit_scale=True, disable=not progress, file=sys.stderr) as bar:
        for name, keys in zip(names, shards, strict=True):
            bar.set_description(name)
            shard = {}
            for key in keys:
                shard[key] = tensors.pop(key)
                mx.eval(shard[key])
                if evaluated is not None:
                    evaluated(key)
                bar.update(shard[key].nbytes)
            mx.save_safetensors(str(directory / name), shard, metadata={"format": "mlx"})
            weight_map.update(dict.fromkeys(keys, name))
            del shard
            mx.clear_cache()
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def output_config(source: dict, dtype_name: str, quantization: dict | None) -> dict:
    """The source config.json with the new dtype and, when quantized, the block MLX tools read: mlx-lm's
    `quantization` (group_size, bits, mode, and per-module entries where a module differs), repeated as
    `quantization_config` as mlx-lm writes it."""
    config = copy.deepcopy(source)
    for section in (config, config.get("text_config"), config.get("vision_config")):
        for key in ("dtype", "torch_dtype"):
            if isinstance(section, dict) and key in section:
                section[key] = dtype_name
    if quantization is not None:
        config["quantization"] = quantization
        config["quantization_config"] = copy.deepcopy(quantization)
    return config


def quantization_block(settings: dict, plan: dict[str, dict]) -> dict:
    """mlx-lm's layout: the defaults, then an entry per module that differs from them, under our module
    path and under the one mlx-lm's and mlx-vlm's Qwen3-VL module trees give it (`language_model.model.`,
    `vision_tower.`): each reads the entries named after its own modules, ours reads the packed shapes."""
    block = dict(settings)
    for path, params in sorted(plan.items()):
        if params != settings:
            block[path] = params
            for theirs, ours in MLX_VLM_PREFIXES.items():
                if f"{path}.".startswith(ours):
                    block[f"{theirs}{path[len(ours) :]}.".rstrip(".")] = params
    return block


def quantization_summary(
    quantization: dict | None, recipe: str | None, quantize_vision: bool, dtype_name: str
) -> str:
    if quantization is None:
        return f"{dtype_name}, not quantized"
    bits = recipe or f"{quantization['bits']}-bit"
    vision = "vision tower quantized too" if quantize_vision else f"vision tower kept in {dtype_name}"
    return f"{bits} affine quantization, group size {quantization['group_size']} ({vision})"


# What a converted model's card shows: its hub pipeline tag and a line of Python that uses it.
CARD_USES = {
    "generate": (
        "image-text-to-text",
        "generate",
        'generate(model, processor, "Describe this image.", images=["photo.jpg"])',
    ),
    "embed": (
        "feature-extraction",
        "embed",
        'embed(model, processor, ["a sentence", {"image": "photo.jpg"}])',
    ),
    "rerank": (
        "text-ranking",
        "rerank",
        'rerank(model, processor, "a query", ["a document", {"image": "photo.jpg"}])',
    ),
}


def write_model_card(
    directory: Path, name: str, base_model: str | None, description: str, task: str = "generate"
) -> None:
    """A short card in the hub's format; base_model only for a hub source (the hub checks it is a repo)."""
    header = f"base_model: {base_model}\n" if base_model else ""
    source = f"`{base_model}`" if base_model else "Qwen3-VL"
    tag, function, use = CARD_USES[task]
    card = f"""---
library_name: mlx
{header}pipeline_tag: {tag}
tags:
- mlx
- qwen3_vl
---

# {name}

{source} converted to MLX by mlx-qwen3vl's `convert.py`: {description}.

```python
from mlx_qwen3vl import {function}, load

model, processor = load("{name}")
print({use})
```
"""
    (directory / "README.md").write_text(card)


def copy_model_files(source: Path, target: Path) -> None:
    """Tokenizer, chat template, generation and preprocessing configs: what the source has of a model
    directory's files (`staging.MODEL_DIRECTORY_FILES`, so that a later --force recognises the output),
    less those the converter writes itself."""
    for file in sorted(source.iterdir()):
        rewritten = any(fnmatch.fnmatch(file.name, p) for p in REWRITTEN_FILES)
        if is_model_file(file.name) and not rewritten and file.is_file():
            shutil.copyfile(file, target / file.name)


def convert(
    hf_path: str | Path,
    mlx_path: str | Path,
    *,
    quantize: bool = False,
    q_bits: int | None = None,
    q_group_size: int | None = None,
    q_recipe: str | None = None,
    target_bits: float | None = None,
    q_layer_bits: dict[str, int] | None = None,
    quantize_vision: bool = False,
    dtype: str = "bfloat16",
    force: bool = False,
    max_shard_size: int = MAX_SHARD_SIZE,
    progress: bool = True,
    check: bool = False,
    calibration=calibration_inputs,
) -> Path:
    """Convert the Qwen3-VL checkpoint at `hf_path` (a model directory or a Hugging Face repo id; the
    published layout or mlx-vlm's) into an MLX model directory at `mlx_path`; returns that path.

    quantize: affine quantization of the language model at q_bits (2, 3, 4, 5, 6 or 8; default 4) with
    q_group_size (32, 64 or 128; default 64); any q_* option or quantize_vision implies it. q_recipe: one
    of mlx-lm's mixed recipes (mixed_2_6, mixed_3_4, mixed_3_6, mixed_4_6), which also keeps the embedding
    and lm_head at the high bit width; or "auto" with target_bits (e.g. 4.5): each layer's bits from 2, 3,
    4, 6, 8 chosen on the calibration set so their average over the quantized weights is at most
    target_bits with the least drift (auto_bits.py). q_layer_bits: {module path: bits} over the rest
    (refused, with the reason, for what must stay in float: quantizable.py). quantize_vision: quantize the
    vision tower's blocks and mergers too (default: it stays in `dtype`). dtype: of every tensor not
    quantized, and of the quantization scales. force: replace an existing output directory (only a model
    directory). check: compare the output with the source (check.py: its tensors as they are
    written, its outputs after), write quantization_report.json beside it and raise Qwen3VLError naming
    the tensor when a bound fails (the output stays, for inspection); convert.py does unless
    --no-check. calibration: processor -> the model inputs the check and the auto recipe measure on (the
    package's set by default)."""
    started = time.perf_counter()
    options = (q_bits, q_group_size, q_recipe, target_bits, q_layer_bits)
    quantize = quantize or quantize_vision or any(v is not None for v in options)
    settings = quantization_settings(q_bits, q_group_size, q_recipe, target_bits) if quantize else None
    dtype_name = str(dtype).rpartition(".")[2]  # also accepts mx.bfloat16 ("mlx.core.bfloat16")
    mx_dtype = resolve_dtype(dtype_name)
    source = model_directory(hf_path)
    target = Target.from_user(mlx_path)
    check_replaceable(target, source, force)

    config = read_config(source)
    # An embedding model is written without the vocabulary projection it never uses; a reranker keeps
    # its checkpoint's layout (load() takes the two rows it reads), so other tools still read it.
    task = model_task(source, str(hf_path))
    model = Model(config, "embed" if task == "embed" else "generate")  # lazy: names and shapes only
    weights = model.sanitize(read_weights(source))
    if any(key.endswith(".scales") for key in weights):
        raise Qwen3VLError(
            f"{source}: the model is already quantized; convert from the unquantized checkpoint"
        )
    check_weights(model, weights)
    patch = "model.visual.patch_embed.proj.weight"
    weights[patch] = model.model.visual.published_patch_embedding(weights[patch])
    plan = quantization_plan(model, settings, q_recipe, quantize_vision, q_layer_bits) if quantize else {}
    if q_recipe == AUTO_RECIPE:
        fixed = router_paths(model) | set(q_layer_bits or ())
        plan = auto_plan(source, plan, target_bits, fixed, progress, calibration)
        settings = {**settings, "bits": most_common_bits(plan)}
    tensors = output_tensors(weights, plan, mx_dtype)
    # The check runs as the tensors are written, from the source tensors the conversion reads and the
    # outputs it computes anyway (check.py: Check): nothing is read twice.
    checking = check and quantize
    report = Report(str(target.path), str(source)) if checking else None
    if checking:
        run = Check(
            model, tensors, weights, report, lambda: calibration(Processor.from_pretrained(source, config))
        )
    del weights, model
    quantization = quantization_block(settings, plan) if quantize else None
    shown_recipe = f"auto-recipe ({target_bits} bits on average)" if q_recipe == AUTO_RECIPE else q_recipe
    description = quantization_summary(settings, shown_recipe, quantize_vision, dtype_name)
    if progress:
        print(f"Converting {source} to {target.shown}: {description}", file=sys.stderr)
        for done in clean_leftovers(target):
            print(done, file=sys.stderr)
    else:
        clean_leftovers(target)

    with staged(target, source, force) as staging:
        write_shards(tensors, staging, max_shard_size, progress, run.arrived if checking else None)
        raw_config = json.loads((source / "config.json").read_text())
        written = output_config(raw_config, dtype_name, quantization)
        if task != "generate":  # what the output is for, whatever it is named (loading.model_task)
            written[TASK_KEY] = task
        config_text = json.dumps(written, indent=2)
        (staging / "config.json").write_text(config_text + "\n")
        copy_model_files(source, staging)
        from_hub = not Path(hf_path).expanduser().exists()
        write_model_card(staging, target.path.name, str(hf_path) if from_hub else None, description, task)
    if progress:
        print(f"Wrote {target.shown} ({directory_size(target.path) / 1e9:.2f} GB)", file=sys.stderr)
    if checking:
        run.finish()
        report.conversion_seconds = time.perf_counter() - started - report.seconds
        report.write(target.path)
        if progress:
            print(report.table(), file=sys.stderr)
        if not report.passed:
            first = report.failures[0]
            raise Qwen3VLError(
                f"{target.shown}: the quantization check failed: {first.tensor} {first.reason} "
                f"({len(report.failures)} failure(s) in all, listed in {REPORT_FILE})"
            )
    return target.path


def most_common_bits(plan: dict[str, dict]) -> int:
    """The bits of most of a plan's modules: the block's default, so that the fewest need an entry."""
    counts: dict[int, int] = {}
    for params in plan.values():
        counts[params["bits"]] = counts.get(params["bits"], 0) + 1
    return max(counts, key=counts.get)


def directory_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))
