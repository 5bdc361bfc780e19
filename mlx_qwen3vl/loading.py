"""Find a model directory, read its config and weights lazily, check them against the model, load().

Weights are opened with `mx.load`, which maps the safetensors files without reading them; tensors are
materialised once, in the requested dtype, when the model's parameters are evaluated.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from .config import ModelConfig
from .errors import Qwen3VLError
from .model import Model
from .processor import Processor

DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}


def resolve_dtype(dtype) -> mx.Dtype:
    if isinstance(dtype, mx.Dtype):
        return dtype
    if dtype not in DTYPES:
        raise Qwen3VLError(f"dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def model_directory(path) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise Qwen3VLError(f"{path}: no such model directory")
    if not path.is_dir():
        raise Qwen3VLError(f"{path}: not a directory (expected a model directory with config.json)")
    return path


def read_config(path: Path) -> ModelConfig:
    file = path / "config.json"
    if not file.exists():
        raise Qwen3VLError(f"{path}: no config.json, this is not a model directory")
    try:
        params = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise Qwen3VLError(f"{file}: not valid JSON ({e})") from None
    try:
        return ModelConfig.from_dict(params)
    except Qwen3VLError as e:
        raise Qwen3VLError(f"{path}/{e}") from None  # the messages start with "config.json"


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a model directory, from its index when there is one."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise Qwen3VLError(f"{index}: unreadable index ({e})") from None
        files = [path / name for name in names]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise Qwen3VLError(f"{path}: weight file {missing[0]} listed in the index is missing")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise Qwen3VLError(f"{path}: no *.safetensors weight files")
    return files


def read_weights(path: Path) -> dict[str, mx.array]:
    weights: dict[str, mx.array] = {}
    for file in weight_files(path):
        try:
            weights.update(mx.load(str(file)))
        except (RuntimeError, ValueError) as e:
            raise Qwen3VLError(f"{file}: cannot read safetensors ({e})") from None
    return weights


def check_weights(model: Model, weights: dict[str, mx.array]) -> None:
    """One clear error for a checkpoint that does not fit the config: it names the tensor."""
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise Qwen3VLError(f"checkpoint is missing tensor {missing[0]} ({len(missing)} missing in all)")
    extra = sorted(set(weights) - set(expected))
    if extra:
        raise Qwen3VLError(f"checkpoint has unexpected tensor {extra[0]} ({len(extra)} unexpected in all)")
    for name, value in weights.items():
        shape, wanted = tuple(value.shape), tuple(expected[name].shape)
        if shape != wanted:
            raise Qwen3VLError(f"tensor {name} has shape {shape}, the config expects {wanted}")


def load_model(path, dtype="bfloat16", lazy: bool = False) -> Model:
    path = model_directory(path)
    dtype = resolve_dtype(dtype)
    config = read_config(path)
    model = Model(config)
    weights = model.sanitize(read_weights(path))
    check_weights(model, weights)
    weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    model.update(tree_unflatten(list(weights.items())))
    if not lazy:
        mx.eval(model.parameters())
    model.eval()
    return model


def load(path, dtype="bfloat16", lazy: bool = False) -> tuple[Model, Processor]:
    """Load a Qwen3-VL model directory (transformers' published layout) as `(model, processor)`.
    dtype: "bfloat16" (default, the checkpoints' own precision), "float32" or "float16"."""
    model = load_model(path, dtype, lazy)
    processor = Processor.from_pretrained(Path(path).expanduser(), model.config)
    return model, processor
