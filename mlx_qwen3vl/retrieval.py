"""Qwen3-VL-Embedding and Qwen3-VL-Reranker: each input (text, images, videos or a mixture) as one
normalised vector, or a query and a document as one relevance score. How the prompts are laid out, which
position is read and how the score is made follow Qwen's reference (docs/embeddings.md).

    model, processor = load("Qwen/Qwen3-VL-Embedding-2B")
    vectors = embed(model, processor, ["a red bicycle", {"image": "photo.jpg"}])      # [2, 2048]
"""

from __future__ import annotations

import sys
import unicodedata
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from .errors import Qwen3VLError
from .media import MediaItem
from .messages import collect_media, media_kind, normalize_messages
from .model import Model
from .processor import Processor
from .progress import Progress

EMBED_INSTRUCTION = "Represent the user's input."
RERANK_INSTRUCTION = "Given a search query, retrieve relevant candidates that answer the query."
RERANK_SYSTEM = (
    "Judge whether the Document meets the requirements based on the Query and the Instruct provided. Note "
    'that the answer can only be "yes" or "no".'
)
# The reference's media sizes (images between 4 and 1,800 merged tokens; videos at 1 frame per second, at
# most 64 frames), which the models were trained with; a part's own options take precedence.
MEDIA_DEFAULTS = {
    "image": {"min_pixels": 4 * 32 * 32, "max_pixels": 1800 * 32 * 32},
    "video": {"fps": 1.0, "max_frames": 64},
}
# The smallest `dimensions` the embedding models are documented for (Matryoshka cuts down to 64).
MIN_DIMENSIONS = 64
# Inputs run together: at most BATCH prompts, padded to the longest, of at most BATCH_TOKENS in all
# (a prompt longer than that runs alone).
BATCH = 8
BATCH_TOKENS = 16384
# The reference's keys of an input given as a dict; "instruction" sets that input's own.
INPUT_KEYS = ("text", "image", "video", "instruction")


@dataclass
class Prompt:
    """One input made ready: its token ids and media (the media read when its batch runs)."""

    messages: list[dict]
    ids: list[int] | None = None
    media: list[MediaItem] | None = None


def content_parts(value, where: str) -> list[dict]:
    """An input as the content parts of a user message: a string is a text part; a dict in the
    reference's form ({"text", "image", "video"}, each one item or a list) gives its videos, then images,
    then texts, as the reference lays them out; a dict with a "type" is one content part; a list is
    content parts as in a chat message."""
    if isinstance(value, str):
        parts = [{"type": "text", "text": value}]
    elif isinstance(value, dict) and "type" in value:  # one content part
        parts = [value]
    elif isinstance(value, dict):
        unknown = set(value) - set(INPUT_KEYS)
        if unknown:
            raise Qwen3VLError(f"{where}: unknown key {sorted(unknown)[0]!r} ({', '.join(INPUT_KEYS)})")
        parts = [{"type": "video", "video": v} for v in _items(value.get("video"), "video")]
        parts += [{"type": "image", "image": v} for v in _items(value.get("image"), "image")]
        parts += [{"type": "text", "text": t} for t in _items(value.get("text"), "text")]
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        raise Qwen3VLError(
            f"{where}: must be a string, a dict of text / image / video, or a list of content parts; "
            f"got {type(value).__name__}"
        )
    parts = normalize_messages([{"role": "user", "content": parts}])[0]["content"]
    if not any(media_kind(p) or p.get("text", "").strip() for p in parts):
        raise Qwen3VLError(f"{where} is empty: give text, an image or a video")
    return [_with_defaults(p) for p in parts]


def _items(value, key: str) -> list:
    """A dict input's text / image / video: one item or a list of them (a video's frames are one item)."""
    if value is None:
        return []
    if key == "video" and isinstance(value, (list, tuple)) and value and not isinstance(value[0], str):
        return [value]  # a list of frames
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _with_defaults(part: dict) -> dict:
    kind = media_kind(part)
    return {**MEDIA_DEFAULTS[kind], **part} if kind else part


def embedding_instruction(instruction: str | None) -> str:
    """The system prompt of an embedding: the instruction, ending in punctuation as the reference makes it."""
    instruction = (instruction or "").strip() or EMBED_INSTRUCTION
    if not unicodedata.category(instruction[-1]).startswith("P"):
        instruction += "."
    return instruction


def embedding_messages(value, instruction: str | None, where: str) -> list[dict]:
    if isinstance(value, dict) and value.get("instruction") is not None:
        instruction = value["instruction"]
    system = {"role": "system", "content": [{"type": "text", "text": embedding_instruction(instruction)}]}
    return [system, {"role": "user", "content": content_parts(value, where)}]


def rerank_messages(query: list[dict], document: list[dict], instruction: str | None) -> list[dict]:
    """The reranker's prompt: a fixed system message, then the instruction, the query and the document,
    each after its label, in one user message."""
    text = [{"type": "text", "text": f"<Instruct>: {instruction or RERANK_INSTRUCTION}"}]
    content = [*text, {"type": "text", "text": "<Query>:"}, *query, {"type": "text", "text": "\n<Document>:"}]
    return [
        {"role": "system", "content": [{"type": "text", "text": RERANK_SYSTEM}]},
        {"role": "user", "content": content + document},
    ]


def read_prompt(processor: Processor, prompt: Prompt) -> None:
    prompt.media = processor.read_all(collect_media(prompt.messages, [], []), {})
    prompt.ids = processor.tokenize(processor.render(prompt.messages), prompt.media)


def batches(prompts: list[Prompt]) -> list[list[int]]:
    """Indices of prompts run together: by length, as many as BATCH and BATCH_TOKENS (padded) allow."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i].ids))
    groups, group = [], []
    for i in order:
        if group and ((len(group) + 1) * len(prompts[i].ids) > BATCH_TOKENS or len(group) == BATCH):
            groups.append(group)
            group = []
        group.append(i)
    return groups + [group] if group else groups


def last_hidden_states(model: Model, prompts: list[Prompt], pad_id: int) -> mx.array:
    """The decoder's final hidden state at each prompt's last token, [n, hidden], the prompts run together.
    Rows are padded on the right: under the causal mask a token never sees the padding after it, so each
    row's last token, and its pooled state, is what the prompt alone gives."""
    lengths = np.array([len(p.ids) for p in prompts])
    ids = np.full((len(prompts), lengths.max()), pad_id, dtype=np.int32)
    for row, prompt in enumerate(prompts):
        ids[row, : lengths[row]] = prompt.ids
    media = [item for prompt in prompts for item in prompt.media]
    prepared = model.prepare(ids, model.encode_media(media) if media else [])
    h = model.hidden_states(prepared)
    return h[mx.arange(len(prompts)), mx.array(lengths - 1)]


def run(model: Model, processor: Processor, prompts: list[Prompt], head, progress=None) -> mx.array:
    """`head` of the pooled states of all prompts, in their order; each group of BATCH inputs is read
    (media included) only when it runs, so a long list never holds more than a batch's pixels. Each
    prompt's `ids` stay (their count is a server's usage)."""
    tokenizer = processor.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[mx.array | None] = [None] * len(prompts)
    bar = None
    if progress is True:  # a bar on the terminal
        bar = tqdm(total=len(prompts), unit="input", file=sys.stderr, leave=False)

        def progress(report: Progress) -> None:
            bar.update(report.done - bar.n)

    for start in range(0, len(prompts), BATCH):
        chunk = prompts[start : start + BATCH]
        for prompt in chunk:
            read_prompt(processor, prompt)
        for group in batches(chunk):
            pooled = head(last_hidden_states(model, [chunk[i] for i in group], pad_id))
            mx.eval(pooled)
            for row, i in enumerate(group):
                out[start + i] = pooled[row]
        for prompt in chunk:
            prompt.media = None  # the pixel rows are not needed again
        if progress:
            progress(Progress("inputs", min(start + BATCH, len(prompts)), len(prompts)))
    if bar is not None:
        bar.close()
    return mx.stack(out)


def _check_task(model: Model, task: str, function: str) -> None:
    if model.task != task:
        names = {"embed": "an embedding model", "rerank": "a reranker", "generate": "a chat model"}
        raise Qwen3VLError(
            f"{function}() needs {names[task]} (Qwen3-VL-{'Embedding' if task == 'embed' else 'Reranker'}), "
            f"this is {names[model.task]}; load(..., task={task!r}) if its name does not say"
        )


def check_dimensions(dimensions, hidden: int) -> None:
    if dimensions is None:
        return
    if isinstance(dimensions, bool) or not isinstance(dimensions, int):
        raise Qwen3VLError(f"dimensions={dimensions!r}: must be an integer")
    if not MIN_DIMENSIONS <= dimensions <= hidden:
        raise Qwen3VLError(f"dimensions={dimensions}: must be between {MIN_DIMENSIONS} and {hidden}")


def _as_list(inputs, name: str) -> list:
    items = (
        [inputs]
        if isinstance(inputs, (str, dict))
        else list(inputs)
        if isinstance(inputs, (list, tuple))
        else None
    )
    if items is None:
        raise Qwen3VLError(f"{name} must be a string, a dict or a list of them, got {type(inputs).__name__}")
    if not items:
        raise Qwen3VLError(f"{name} is empty: nothing to {'embed' if name == 'inputs' else 'score'}")
    return items


def embed(
    model: Model,
    processor: Processor,
    inputs,
    instruction: str | None = None,
    dimensions: int | None = None,
    progress=None,
) -> mx.array:
    """One L2-normalised vector per input, [n, dim], from an embedding model (Qwen3-VL-Embedding).

    inputs: one input or a list. An input is a string, a dict with any of "text", "image", "video" (each
    one item or a list; "instruction" for its own) or a list of content parts as in a chat message; images
    and videos in every form `generate` takes. A list of content parts (not of inputs) is passed as
    `[parts]`. instruction: what the vectors are for (the reference's default "Represent the user's
    input."). dimensions: keep the first `dimensions` components (Matryoshka), then normalise. progress:
    called with a `Progress("inputs", done, total)` after each batch; True: a bar on stderr."""
    return embed_prompts(model, processor, inputs, instruction, dimensions, progress)[0]


def embed_prompts(model, processor, inputs, instruction=None, dimensions=None, progress=None):
    """`embed`'s vectors and the prompts they came from (their token ids)."""
    _check_task(model, "embed", "embed")
    check_dimensions(dimensions, model.config.text_config.hidden_size)
    items = _as_list(inputs, "inputs")
    prompts = [Prompt(embedding_messages(v, instruction, f"input {i + 1}")) for i, v in enumerate(items)]

    def head(pooled: mx.array) -> mx.array:
        pooled = pooled[:, :dimensions].astype(mx.float32)
        return pooled / mx.linalg.norm(pooled, axis=-1, keepdims=True)

    return run(model, processor, prompts, head, progress), prompts


def rerank(
    model: Model, processor: Processor, query, documents, instruction: str | None = None, progress=None
) -> list[float]:
    """How well each document answers the query, in [0, 1], from a reranker (Qwen3-VL-Reranker): the
    probability of "yes" against "no" as the answer's first token. The query and each document take the
    forms of `embed`'s inputs."""
    return rerank_prompts(model, processor, query, documents, instruction, progress)[0]


def rerank_prompts(model, processor, query, documents, instruction=None, progress=None):
    """`rerank`'s scores and the prompts they came from (their token ids)."""
    _check_task(model, "rerank", "rerank")
    query_parts = content_parts(query, "the query")
    docs = _as_list(documents, "documents")
    prompts = [
        Prompt(rerank_messages(query_parts, content_parts(d, f"document {i + 1}"), instruction))
        for i, d in enumerate(docs)
    ]

    def head(pooled: mx.array) -> mx.array:
        logits = pooled.astype(mx.float32) @ model.score_rows.astype(mx.float32).T  # [n, (yes, no)]
        return mx.sigmoid(logits[:, 0] - logits[:, 1])

    return run(model, processor, prompts, head, progress).tolist(), prompts
