"""Find a model directory, read its config and weights lazily, check them against the model, load().

Weights are opened with `mx.load`, which maps the safetensors files without reading them; tensors are
materialised once, in the requested dtype, when the model's parameters are evaluated. The layouts read:
transformers' published one, this package's converter output (quantized at any bits, or mixed), and
mlx-vlm's (the MLX community's Qwen3-VL conversions); `Model.sanitize` maps the key names.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.switch_layers import QuantizedSwitchLinear
from mlx_lm.utils import infer_quant_config

from .backend import Backend
from .config import ModelConfig
from .errors import Qwen3VLError
from .model import TASKS, VISION_MEMORY_SHARE, Model
from .options import DEFAULT_MODEL
from .processor import Processor

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
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Qwen3VLError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(params, dict):
        raise Qwen3VLError(f"{file}: must be a JSON object, not {type(params).__name__}")
    try:
        return ModelConfig.from_dict(params)
    except Qwen3VLError as e:
        raise Qwen3VLError(f"{path}/{e}") from None  # the messages start with "config.json"


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a model directory, from its index when there is one."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = [path / name for name in sorted(set(index_weight_map(index).values()))]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise Qwen3VLError(f"{path}: weight file {missing[0]} listed in the index is missing")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise Qwen3VLError(f"{path}: no *.safetensors weight files")
    return files


def index_weight_map(index: Path) -> dict[str, str]:
    """model.safetensors.index.json's weight_map (tensor name: file name), checked: a file of another
    shape would fail later as a Python error with neither the file nor the field in it."""
    try:
        content = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Qwen3VLError(f"{index}: not valid JSON ({e})") from None
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(name, str) and isinstance(file, str) and file for name, file in weight_map.items()
    ):
        raise Qwen3VLError(
            f"{index}: weight_map is {weight_map!r:.40}, must be an object of tensor names to file names"
        )
    return weight_map


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
    """Floating-point tensors in the compute dtype, except where another dtype serves exactly:
    - the scales and biases of quantized linear layers keep the checkpoint's dtype. A quantized matmul
      takes float32 activations with bfloat16 scales and gives the same numbers (bfloat16 widens
      exactly), so float32 compute on the CPU costs no extra memory or load time there (widened, they
      would add 11% to a 4-bit layer's bytes). The price is MLX's one-row CPU kernel running a little
      slower with them (`bench/matmul.py` measures it), in a decode step's share of that kernel.
      A quantized embedding's do take the compute dtype: it dequantizes in its scales' dtype, and its
      output is the activations' start.
    - modules that say `keeps_stored_dtype` (`cpu/widening.py`) keep a narrower stored dtype and widen
      per call; modules that say `float32_parameters` (the vision LayerNorm, which computes in float32)
      get float32."""
    kept, widening, wide = set(), set(), set()
    for name, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, QuantizedSwitchLinear)):  # the experts' too
            kept.add(name)
        if getattr(module, "keeps_stored_dtype", False):
            widening.add(name)
        if getattr(module, "float32_parameters", False):
            wide.add(name)

    def cast(key: str, value: mx.array) -> mx.array:
        module, _, name = key.rpartition(".")
        if not mx.issubdtype(value.dtype, mx.floating) or (module in kept and name in ("scales", "biases")):
            return value
        if module in widening and value.dtype.size < dtype.size:
            return value
        return value.astype(mx.float32 if module in wide else dtype)

    return {k: cast(k, v) for k, v in weights.items()}


# The config.json key that says what a checkpoint converted by this package is for (convert.py writes it
# for the embedding and reranker models; the published ones say nothing: `model_task`).
TASK_KEY = "mlx_qwen3vl_task"
# The words that name Qwen's retrieval checkpoints (Qwen/Qwen3-VL-Embedding-2B, Qwen3-VL-Reranker-8B, and
# conversions that keep the name): their config.json is a chat model's (Qwen3VLForConditionalGeneration).
TASK_NAMES = {"embedding": "embed", "reranker": "rerank"}


def model_task(path: Path, name: str, requested: str | None = None) -> str:
    """What the model at `path` (asked for as `name`) is for: `requested` if given, else what
    convert.py recorded in its config.json, else what its name says, else "generate"."""
    if requested is not None:
        if requested not in TASKS:
            raise Qwen3VLError(f"task={requested!r}: must be one of {', '.join(TASKS)}")
        return requested
    try:
        recorded = json.loads((path / "config.json").read_text()).get(TASK_KEY)
    except (OSError, ValueError, AttributeError):
        recorded = None  # read_config reports an unreadable config.json
    if recorded in TASKS:
        return recorded
    words = f"{name} {path.name}".lower()
    return next((task for word, task in TASK_NAMES.items() if word in words), "generate")


# The reranker's answer tokens: its score is P("yes") against "no" at the prompt's last position.
SCORE_TOKENS = ("yes", "no")


def score_token_ids(tokenizer) -> tuple[int, ...]:
    vocabulary = tokenizer.get_vocab()
    missing = [t for t in SCORE_TOKENS if t not in vocabulary]
    if missing:
        raise Qwen3VLError(f"the tokenizer has no token {missing[0]!r}, which a reranker scores with")
    return tuple(vocabulary[t] for t in SCORE_TOKENS)


def load_model(
    path: Path,
    dtype=None,
    lazy: bool = False,
    backend: str | None = None,
    task: str = "generate",
    score_tokens: tuple[int, ...] = (),
    group=None,
    pipeline: bool = False,
) -> Model:
    """The model of a directory; with a distributed `group` of several ranks, this rank's part of it
    (`distributed/`): sharded before any weight is evaluated, so only that part stays in memory."""
    shard = None
    if group is not None and group.size() > 1:
        from .distributed import shard as shard_across

        def shard(model: Model) -> None:
            shard_across(model, group, path, pipeline)

    config = read_config(path)
    return model_from_weights(config, read_weights(path), dtype, lazy, backend, task, score_tokens, shard)


def model_from_weights(
    config: ModelConfig,
    weights: dict[str, mx.array],
    dtype=None,
    lazy: bool = False,
    backend: str | None = None,
    task: str = "generate",
    score_tokens: tuple[int, ...] = (),
    shard: Callable[[Model], None] | None = None,
) -> Model:
    """The model of a config and a checkpoint's tensors, lazy or not (a directory's, or those convert.py
    is writing, which the quantization check runs as they are written). shard: applied before any weight
    is evaluated (a distributed rank's part)."""
    backend = Backend.choose(backend, dtype)
    model = Model(config, task, score_tokens)
    weights = model.sanitize(dict(weights))
    quantize_as_stored(model, weights)
    backend.specialize(model)  # before the weights are cast: some modules keep their stored dtype
    check_weights(model, weights)
    model.update(tree_unflatten(list(in_compute_dtype(model, weights, backend.dtype).items())))
    del weights  # the fused matrices below are then the only holders of their parts
    if shard is not None:
        shard(model)
        backend.specialize(model)  # the vocabulary projection's new part
    model.fuse_projections()
    model.backend = backend
    if not lazy:
        evaluate(model)
    model.eval()
    return model


def evaluate(model: Model) -> None:
    """Materialise the parameters a decoder layer at a time: each layer's fused matrices are built from
    its stored parts, which are freed before the next layer's are read (peak: the model plus one layer)."""
    for layer in model.layers:
        mx.eval(layer.parameters())
    mx.eval(model.parameters())


def load(
    path_or_repo=DEFAULT_MODEL,
    dtype=None,
    lazy: bool = False,
    backend: str | None = None,
    vision_budget: int | None = None,
    task: str | None = None,
    group=None,
    pipeline: bool = False,
) -> tuple[Model, Processor]:
    """Load Qwen3-VL as `(model, processor)` from a model directory or a Hugging Face repo id (downloaded
    once into the hub cache): transformers' published layout, a directory written by `convert.py`
    (quantized or not), or one converted by mlx-vlm / published by the MLX community.

    dtype: the compute dtype, "bfloat16", "float32" or "float16". backend: "gpu" (the plain model, as MLX
    runs it on a Mac's GPU) or "cpu" (with the CPU specialisations); None follows MLX's default device,
    and a None dtype then the backend's default (bfloat16 on the GPU, float32 on the CPU; `backend.py`).
    Quantized layers keep their packed weights and, except the embedding's, their stored scales
    (`in_compute_dtype`). vision_budget: bytes the vision tower's activations may take at once (a long
    video or many images are encoded in pieces that fit it, `Model.encode_vision`); None: an eighth of
    MLX's memory limit. task: "generate", "embed" (Qwen3-VL-Embedding: `embed()`) or "rerank"
    (Qwen3-VL-Reranker: `rerank()`); None: what the model's name says (`model_task`).

    group: an `mx.distributed.Group` of several ranks (processes started by `mlx.launch`): this rank
    loads its part of the model, tensor parallel, or with `pipeline` its consecutive decoder layers
    (docs/distributed.md); every rank must load the same model directory and then run the same calls.
    None: the whole model in this process."""
    if vision_budget is not None and (isinstance(vision_budget, bool) or not isinstance(vision_budget, int)):
        raise Qwen3VLError(f"vision_budget={vision_budget!r}: must be a number of bytes (an integer)")
    if vision_budget is not None and vision_budget <= 0:
        raise Qwen3VLError(f"vision_budget={vision_budget}: must be > 0 bytes")
    path = model_directory(path_or_repo)
    task = model_task(path, str(path_or_repo), task)
    if group is not None and group.size() > 1:
        if task != "generate":
            raise Qwen3VLError(f"a {task} model runs in one process; load it without a distributed group")
        from .distributed import check_same_model

        check_same_model(path, group)
    if task != "rerank":
        model = load_model(path, dtype, lazy, backend, task, group=group, pipeline=pipeline)
        processor = Processor.from_pretrained(path, model.config)
    else:  # the rows it keeps of the vocabulary projection are those of tokens the tokenizer knows
        processor = Processor.from_pretrained(path, read_config(path))
        model = load_model(path, dtype, lazy, backend, task, score_token_ids(processor.tokenizer))
    model.vision_budget = vision_budget
    if group is not None and group.size() > 1:
        from .distributed import agreed_vision_budget

        budget = vision_budget or mx.get_memory_limit() * VISION_MEMORY_SHARE
        model.vision_budget = agreed_vision_budget(budget, group)
    return model, processor
