"""Find a model directory, read its config and weights lazily, check them against the model, load().

Weights are opened with `mx.load`, which maps the safetensors files without reading them; tensors are
materialised once, in the requested dtype, when the model's parameters are evaluated. The layouts read:
transformers' published one, this package's converter output (quantized at any bits, or mixed), and
mlx-vlm's (the MLX community's Qwen3-VL conversions); `Model.sanitize` maps the key names.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.utils import infer_quant_config

from .config import ModelConfig
from .errors import Qwen3VLError
from .model import Model
from .options import DEFAULT_MODEL, DTYPE_NAMES
from .processor import Processor
from .vision import WideningLinear

DTYPES = {name: getattr(mx, name) for name in DTYPE_NAMES}


def default_dtype() -> str:
    """The compute dtype where none is asked for. On a GPU, bfloat16: the checkpoints' own precision and
    half the memory. On the CPU, float32: MLX's float32 matmuls go through BLAS (with OpenBLAS ~20x
    faster than its bfloat16 kernels on a 2-core x86 machine), 4-bit matmuls with float32 activations ran
    8.6x faster than with bfloat16 ones there, and float32 matches the reference to ~1e-6. It doubles
    the memory of unquantized weights: pass dtype="bfloat16" to trade speed for memory."""
    return "bfloat16" if mx.default_device() == mx.gpu else "float32"


def resolve_dtype(dtype) -> mx.Dtype:
    if dtype is None:
        dtype = default_dtype()
    if isinstance(dtype, mx.Dtype):
        return dtype
    if dtype not in DTYPES:
        raise Qwen3VLError(f"dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


# What a model directory needs; the hub download skips everything else (other formats, images, ...).
MODEL_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "tokenizer.model"]


# huggingface_hub's command-line tool (installed with it) that fills the cache load() reads.
DOWNLOAD_COMMAND = "hf download"


def _looks_like_repo_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~")) and "\\" not in text


def model_directory(path_or_repo) -> Path:
    """A local model directory, or a Hugging Face repo id fetched with huggingface_hub into its cache."""
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not path.is_dir():
            raise Qwen3VLError(f"{path}: not a directory (expected a model directory with config.json)")
        return path
    if not _looks_like_repo_id(str(path_or_repo)):
        raise Qwen3VLError(f"{path}: no such model directory")
    return download(str(path_or_repo))


def download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=MODEL_FILES))
    except RepositoryNotFoundError:
        raise Qwen3VLError(
            f"{repo_id}: no such model on the Hugging Face hub (or it needs a login)"
        ) from None
    except LocalEntryNotFoundError:
        raise Qwen3VLError(
            f"{repo_id} is not downloaded and the hub cannot be reached (offline?): run "
            f"'{DOWNLOAD_COMMAND} {repo_id}' with network access, or pass a local model directory"
        ) from None
    except Exception as e:  # network and HTTP errors come in many types; all mean the same to a user
        raise Qwen3VLError(f"{repo_id}: download failed ({type(e).__name__}: {e})".splitlines()[0]) from None


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


def quantize_as_stored(model: Model, weights: dict[str, mx.array]) -> None:
    """Swap in a quantized layer for each module the checkpoint stores quantized (it has `.scales`), with
    the bits and group size its tensors were packed with. The tensors decide, not config.json's
    `quantization` block: its per-module entries are named after the converter's module tree (ours or
    mlx-vlm's), while the packed shapes determine both numbers given the layer's input width (mlx-lm's
    `infer_quant_config`, which its own loader uses for modules the block does not name)."""

    def stored_quantized(path: str, module: nn.Module):
        if not hasattr(module, "to_quantized") or not {f"{path}.scales", f"{path}.weight"} <= weights.keys():
            return False  # a stray `.scales` is then reported by check_weights as an unexpected tensor
        try:
            return infer_quant_config(path, module, weights)
        except ValueError as e:
            raise Qwen3VLError(f"tensor {path}.weight: {e}") from None

    try:
        nn.quantize(model, class_predicate=stored_quantized)
    except ValueError as e:  # packed shapes that give no bit width MLX supports
        raise Qwen3VLError(f"checkpoint has quantized tensors that do not fit the config ({e})") from None


def in_compute_dtype(model: Model, weights: dict[str, mx.array], dtype: mx.Dtype) -> dict[str, mx.array]:
    """Floating-point tensors in the compute dtype, except where a narrower stored dtype serves exactly:
    - the scales and biases of quantized linear layers keep the checkpoint's dtype. A quantized matmul
      takes float32 activations with bfloat16 scales at the same speed and gives the same numbers
      (bfloat16 widens exactly), so float32 compute on the CPU costs no extra memory or load time there.
      A quantized embedding's do take the compute dtype: it dequantizes in its scales' dtype, and its
      output is the activations' start.
    - the vision tower's `WideningLinear` layers keep a narrower stored dtype and widen per call."""
    kept = {name for name, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)}
    widening = {name for name, m in model.named_modules() if isinstance(m, WideningLinear)}

    def cast(key: str, value: mx.array) -> mx.array:
        module, _, name = key.rpartition(".")
        if not mx.issubdtype(value.dtype, mx.floating) or (module in kept and name in ("scales", "biases")):
            return value
        if module in widening and value.dtype.size < dtype.size:
            return value
        return value.astype(dtype)

    return {k: cast(k, v) for k, v in weights.items()}


def load_model(path: Path, dtype=None, lazy: bool = False) -> Model:
    dtype = resolve_dtype(dtype)
    config = read_config(path)
    model = Model(config)
    weights = model.sanitize(read_weights(path))
    quantize_as_stored(model, weights)
    check_weights(model, weights)
    model.update(tree_unflatten(list(in_compute_dtype(model, weights, dtype).items())))
    if not lazy:
        mx.eval(model.parameters())
    model.eval()
    return model


def load(path_or_repo=DEFAULT_MODEL, dtype=None, lazy: bool = False) -> tuple[Model, Processor]:
    """Load Qwen3-VL as `(model, processor)` from a model directory or a Hugging Face repo id (downloaded
    once into the hub cache): transformers' published layout, a directory written by `convert.py`
    (quantized or not), or one converted by mlx-vlm / published by the MLX community. dtype: the compute
    dtype, "bfloat16", "float32" or "float16"; None picks per backend (`default_dtype`: bfloat16 on a GPU,
    float32 on the CPU). Quantized layers keep their packed weights and, except the embedding's, their
    stored scales (`in_compute_dtype`)."""
    path = model_directory(path_or_repo)
    model = load_model(path, dtype, lazy)
    return model, Processor.from_pretrained(path, model.config)
