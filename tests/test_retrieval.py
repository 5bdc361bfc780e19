"""Qwen3-VL-Embedding and Qwen3-VL-Reranker against the reference computation: transformers' model on the
same random weights, fed the prompts Qwen's reference code lays out (written out here), then its pooling
(the last real token's final hidden state, right padding), L2 normalisation, and the reranker's
sigmoid of the "yes" minus "no" logits. Float32 throughout: agreement within 1e-5."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import openai
import pytest
import torch
import uvicorn
from checkpoints import TINY, build_checkpoint, reference_model
from media import picture, png_bytes, write_video
from prompts import torch_inputs
from starlette.testclient import TestClient

from mlx_qwen3vl import Qwen3VLError, embed, generate, load, rerank
from mlx_qwen3vl.progress import Progress
from mlx_qwen3vl.serving.app import create_app
from mlx_qwen3vl.serving.engine import Engine
from mlx_qwen3vl.serving.media import MediaPolicy
from mlx_qwen3vl.serving.retrieval import create_retrieval_app
from mlx_qwen3vl.video import VideoOptions

# The reference's fixed texts, as its code writes them.
EMBED_DEFAULT = "Represent the user's input."
RERANK_SYSTEM = (
    "Judge whether the Document meets the requirements based on the Query and the Instruct provided. "
    'Note that the answer can only be "yes" or "no".'
)
RERANK_DEFAULT = "Given a search query, retrieve relevant candidates that answer the query."
# Float32 on both sides; the values are of order 1 (normalised vectors, probabilities).
TOLERANCE = 1e-5
# Small video frames (a part's own options), to keep the test's prompts short.
SMALL_FRAMES = {"min_pixels": 4096, "max_pixels": 8192}


@pytest.fixture(scope="module")
def embedder(tiny_checkpoint, checkpoint_root):
    """The tiny checkpoint under an embedding model's name (the published ones are Qwen3-VL checkpoints
    that only their name tells apart), loaded in float32."""
    target = checkpoint_root / "tiny-Qwen3-VL-Embedding"
    if not target.exists():
        target.mkdir()
        for file in tiny_checkpoint.iterdir():
            (target / file.name).symlink_to(file)
    return target, load(target, dtype="float32")


@pytest.fixture(scope="module")
def reranker(checkpoint_root):
    """A reranker with an untied lm_head (as the 8B), so its rows are read from lm_head, not the embedding."""
    untied = {
        **TINY,
        "tie_word_embeddings": False,
        "text_config": {**TINY["text_config"], "tie_word_embeddings": False},
    }
    path = checkpoint_root / "tiny-Qwen3-VL-Reranker"
    if not path.exists():
        build_checkpoint(path, untied, seed=3)
    return path, load(path, dtype="float32")


def reference_ids(tokenizer, system: str, user: list) -> list[int]:
    """The chat template's text with `user` a list of text pieces and media items, each media item's
    placeholder expanded to its tokens, tokenized as a whole, as transformers' processor does."""
    text = f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n"
    for piece in user:
        if isinstance(piece, str):
            text += piece
            continue
        t, h, w = piece.grid_thw
        pads = ("<|image_pad|>" if piece.kind == "image" else "<|video_pad|>") * (h * w // 4)
        if piece.kind == "image":
            text += f"<|vision_start|>{pads}<|vision_end|>"
        else:
            text += "".join(
                f"<{s:.1f} seconds><|vision_start|>{pads}<|vision_end|>" for s in piece.timestamps
            )
    return tokenizer.encode(text + "<|im_end|>\n<|im_start|>assistant\n")


def reference_hidden(reference, rows: list[tuple[list[int], list]]) -> torch.Tensor:
    """transformers' final hidden states of the rows (ids, media) run as one right-padded batch, as the
    reference embedder runs them, pooled at each row's last real token."""
    length = max(len(ids) for ids, _ in rows)
    ids = np.full((len(rows), length), 151643, dtype=np.int64)
    mask = np.zeros_like(ids)
    for r, (row, _) in enumerate(rows):
        ids[r, : len(row)], mask[r, : len(row)] = row, 1
    media = [m for _, items in rows for m in items]
    inputs = {"input_ids": ids}
    for kind, values, grids in (
        ("image", "pixel_values", "image_grid_thw"),
        ("video", "pixel_values_videos", "video_grid_thw"),
    ):
        items = [m for m in media if m.kind == kind]
        if items:
            inputs[values] = np.concatenate([m.pixel_values for m in items])
            inputs[grids] = np.array([m.grid_thw for m in items])
    arguments = torch_inputs(inputs)
    arguments["attention_mask"] = torch.tensor(mask)
    with torch.no_grad():
        hidden = reference.model(**arguments).last_hidden_state
    last = torch.tensor(mask).flip(1).argmax(1)
    return hidden[torch.arange(len(rows)), length - 1 - last]


def test_embeddings_match_the_reference_and_a_batch_equals_one_by_one(embedder, tmp_path):
    path, (model, processor) = embedder
    photo, small = picture(96, 64, seed=1), picture(48, 80, seed=2)
    video = write_video(tmp_path / "clip.avi", frames=12, fps=4.0)
    clip = {"type": "video", "video": video, **SMALL_FRAMES}
    inputs = [
        "A woman playing with her dog on a beach at sunset.",
        {"image": photo},
        [clip],
        [clip, {"type": "image_url", "image_url": {"url": small}}, {"type": "text", "text": "in both?"}],
        {"text": "a picture and a question", "image": small},  # the reference's order: image, then text
        {"type": "image", "image": photo},  # one content part
    ]
    instruction = "Retrieve images that match the caption"  # no final punctuation: the reference adds "."
    progress = []
    ours = np.array(embed(model, processor, inputs, instruction=instruction, progress=progress.append))

    # The reference's sizes: images between 4 and 1,800 merged tokens, videos at 1 frame per second.
    read_photo = processor.read_image(photo, 4 * 32 * 32, 1800 * 32 * 32)
    read_small = processor.read_image(small, 4 * 32 * 32, 1800 * 32 * 32)
    read_video = processor.read_video(video, VideoOptions(fps=1.0, max_frames=64, **SMALL_FRAMES))
    system = instruction + "."
    rows = [
        (reference_ids(processor.tokenizer, system, [inputs[0]]), []),
        (reference_ids(processor.tokenizer, system, [read_photo]), [read_photo]),
        (reference_ids(processor.tokenizer, system, [read_video]), [read_video]),
        (
            reference_ids(processor.tokenizer, system, [read_video, read_small, "in both?"]),
            [read_small, read_video],
        ),
        (reference_ids(processor.tokenizer, system, [read_small, "a picture and a question"]), [read_small]),
        (reference_ids(processor.tokenizer, system, [read_photo]), [read_photo]),
    ]
    pooled = reference_hidden(reference_model(path, torch.float32), rows)
    expected = torch.nn.functional.normalize(pooled, p=2, dim=-1).numpy()
    assert ours.shape == (6, model.config.text_config.hidden_size)
    np.testing.assert_allclose(ours, expected, atol=TOLERANCE)
    assert progress[-1] == Progress("inputs", 6, 6)

    # One by one, each alone (no padding), gives the batch's vectors.
    alone = np.concatenate([np.array(embed(model, processor, [x], instruction=instruction)) for x in inputs])
    np.testing.assert_allclose(alone, ours, atol=TOLERANCE)

    # Matryoshka: the first `dimensions` components, normalised again; the default instruction.
    cut = np.array(embed(model, processor, "a sentence", dimensions=64))
    row = reference_ids(processor.tokenizer, EMBED_DEFAULT, ["a sentence"])
    full = reference_hidden(reference_model(path, torch.float32), [(row, [])])[:, :64]
    np.testing.assert_allclose(cut, torch.nn.functional.normalize(full, dim=-1).numpy(), atol=TOLERANCE)


def test_reranker_scores_match_the_reference(reranker):
    path, (model, processor) = reranker
    assert not hasattr(model, "lm_head") and model.score_rows.shape == (2, 128)
    photo = picture(64, 64, seed=4)
    query = "a dog on a beach"
    documents = [
        "A golden retriever runs along the shore.",
        {"image": photo},
        {"text": "a photo", "image": photo},
    ]
    scores = rerank(model, processor, query, documents, instruction="Find the matching photo.")

    reference = reference_model(path, torch.float32)
    vocabulary = processor.tokenizer.get_vocab()
    weight = reference.lm_head.weight
    direction = weight[vocabulary["yes"]] - weight[vocabulary["no"]]
    read_photo = processor.read_image(photo, 4 * 32 * 32, 1800 * 32 * 32)
    docs = [[documents[0]], [read_photo], [read_photo, "a photo"]]
    expected = []
    for doc in docs:
        user = ["<Instruct>: Find the matching photo.<Query>:", query, "\n<Document>:", *doc]
        ids = reference_ids(processor.tokenizer, RERANK_SYSTEM, user)
        hidden = reference_hidden(reference, [(ids, [m for m in doc if not isinstance(m, str)])])
        expected.append(torch.sigmoid(hidden[0] @ direction).item())
    np.testing.assert_allclose(scores, expected, atol=TOLERANCE)
    assert all(0 <= s <= 1 for s in scores)
    # The default instruction, and the batch of three against each document alone.
    batch = rerank(model, processor, {"text": query}, documents)
    alone = [rerank(model, processor, query, [d])[0] for d in documents]
    np.testing.assert_allclose(batch, alone, atol=TOLERANCE)
    user = [f"<Instruct>: {RERANK_DEFAULT}<Query>:", query, "\n<Document>:", documents[0]]
    hidden = reference_hidden(reference, [(reference_ids(processor.tokenizer, RERANK_SYSTEM, user), [])])
    np.testing.assert_allclose(batch[0], torch.sigmoid(hidden[0] @ direction).item(), atol=TOLERANCE)


def test_bad_retrieval_inputs_are_one_line_errors(embedder, reranker, tiny_f32):
    _, (model, processor) = embedder
    cases = [
        ([], "inputs is empty"),
        ("   ", "input 1 is empty"),
        ([{"text": "x", "colour": "red"}], "unknown key 'colour'"),
        ([{"image": b"not an image"}], "image"),
    ]
    for inputs, message in cases:
        with pytest.raises(Qwen3VLError, match=message):
            embed(model, processor, inputs)
    for dimensions in (0, 32, 129, "64"):
        with pytest.raises(Qwen3VLError, match="dimensions="):
            embed(model, processor, "x", dimensions=dimensions)
    with pytest.raises(Qwen3VLError, match="needs a reranker"):
        rerank(model, processor, "q", ["d"])
    with pytest.raises(Qwen3VLError, match="does not answer: use embed"):
        generate(model, processor, "hello", max_tokens=2)
    with pytest.raises(Qwen3VLError, match="needs an embedding model"):
        embed(*reranker[1], "x")
    with pytest.raises(Qwen3VLError, match="this is a chat model"):
        embed(*tiny_f32, "x")
    with pytest.raises(Qwen3VLError, match="documents is empty"):
        rerank(*reranker[1], "q", [])


def test_converted_models_keep_their_task_and_results(embedder, reranker, tmp_path):
    """convert.py records what the model is for (the output's name need not say it); the embedding
    model is written without lm_head; the reranker keeps its layout, quantized too."""
    from mlx_qwen3vl.convert import convert
    from mlx_qwen3vl.loading import model_task, read_weights

    out = convert(embedder[0], tmp_path / "vectors", progress=False)
    assert not any(k.startswith("lm_head") for k in read_weights(out))
    assert model_task(out, str(out)) == "embed" and model_task(embedder[0], "any") == "embed"
    assert model_task(out, str(out), "generate") == "generate"  # load(task=...) decides first
    assert "print(embed(model, processor" in (out / "README.md").read_text()

    out = convert(reranker[0], tmp_path / "scores", q_bits=8, progress=False)
    assert "lm_head.scales" in read_weights(out)
    quantized = load(out, dtype="float32")
    assert quantized[0].task == "rerank" and not hasattr(quantized[0], "lm_head")
    documents = ["a dog", {"image": picture(64, 64, seed=6)}]
    # 8-bit weights: the scores move by the quantization error of the whole model.
    np.testing.assert_allclose(
        rerank(*quantized, "q", documents), rerank(*reranker[1], "q", documents), atol=0.02
    )


class Served:
    """create_retrieval_app + uvicorn in a thread of this process, on a port the system picks."""

    def __init__(self, model, processor):
        listening = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{listening.getsockname()[1]}"
        app = create_retrieval_app(model, processor, "tiny", policy=MediaPolicy(max_bytes=1_000_000))
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [listening]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60  # a bound that makes a hang fail
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0, timeout=60)

    def post(self, path: str, body: dict) -> tuple[int, dict]:
        request = urllib.request.Request(
            self.url + path, json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


def data_url(image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def assert_refused(status: int, body: dict, words: str, param: str | None = None) -> None:
    """OpenAI's error shape: a 400 with one line that says what is wrong."""
    assert status == 400 and set(body) == {"error"}, body
    assert words in body["error"]["message"] and "\n" not in body["error"]["message"]
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["param"] == param


def test_embeddings_server_answers_the_openai_client(embedder):
    _, (model, processor) = embedder
    served = Served(model, processor)
    try:
        client, photo = served.client, picture(64, 48, seed=7)
        one = client.embeddings.create(model="tiny", input="a red bicycle")  # the client asks for base64
        assert one.usage.prompt_tokens > 0 and one.data[0].index == 0
        expected = np.array(embed(model, processor, ["a red bicycle", "two", {"image": photo}]))
        np.testing.assert_allclose(one.data[0].embedding, expected[0], atol=1e-6)
        many = client.embeddings.create(
            model="tiny",
            input=["a red bicycle", "two", {"type": "image_url", "image_url": {"url": data_url(photo)}}],
            encoding_format="float",
        )
        np.testing.assert_allclose([d.embedding for d in many.data], expected, atol=1e-6)
        cut = client.embeddings.create(model="tiny", input="two", dimensions=64)
        np.testing.assert_allclose(
            cut.data[0].embedding, embed(model, processor, "two", dimensions=64)[0], atol=1e-6
        )
        # vLLM's form: a system message is the instruction, the user message's parts one input.
        status, body = served.post(
            "/v1/embeddings",
            {
                "messages": [
                    {"role": "system", "content": "Find photos."},
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": data_url(photo)}}],
                    },
                ]
            },
        )
        assert status == 200
        np.testing.assert_allclose(
            body["data"][0]["embedding"],
            embed(model, processor, {"image": photo}, instruction="Find photos.")[0],
            atol=1e-6,
        )

        unreadable = {
            "type": "image_url",
            "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"no image").decode()},
        }
        for body, words, param in [
            ({"input": ""}, "input 1 is empty", None),
            ({"input": []}, "non-empty", "input"),
            ({"input": [unreadable]}, "image", None),
            ({"input": "x", "dimensions": 8}, "dimensions=8", "dimensions"),
            ({"input": "x", "encoding_format": "int8"}, "encoding_format", "encoding_format"),
        ]:
            assert_refused(*served.post("/v1/embeddings", body), words, param)
        with pytest.raises(openai.BadRequestError, match="dimensions=4096"):
            client.embeddings.create(model="tiny", input="x", dimensions=4096)
        with pytest.raises(openai.BadRequestError, match="needs a chat model"):
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
        assert_refused(*served.post("/v1/rerank", {"query": "q", "documents": ["d"]}), "needs a reranker")
    finally:
        served.close()


def test_rerank_server_answers_plain_http(reranker, tiny_f32):
    _, (model, processor) = reranker
    served = Served(model, processor)
    try:
        photo = picture(64, 48, seed=8)
        documents = [
            "a cat",
            "a dog on a beach",
            {"content": [{"type": "image_url", "image_url": {"url": data_url(photo)}}]},
        ]
        status, body = served.post("/v1/rerank", {"query": "a dog", "documents": documents, "top_n": 2})
        assert status == 200, body
        scores = rerank(model, processor, "a dog", ["a cat", "a dog on a beach", {"image": photo}])
        best = sorted(range(3), key=lambda i: -scores[i])[:2]
        assert [r["index"] for r in body["results"]] == best
        np.testing.assert_allclose(
            [r["relevance_score"] for r in body["results"]], [scores[i] for i in best], atol=1e-6
        )
        assert_refused(*served.post("/v1/rerank", {"query": "q", "documents": []}), "documents", "documents")
        assert_refused(
            *served.post("/v1/rerank", {"query": "q", "documents": ["d"], "top_n": 0}), "top_n", "top_n"
        )
        assert_refused(*served.post("/v1/embeddings", {"input": "x"}), "needs an embedding model")
        assert_refused(*served.post("/v1/chat/completions", {"messages": []}), "needs a chat model")
    finally:
        served.close()
    # The reverse: a chat model's server refuses the retrieval routes with the same one line.
    chat = TestClient(create_app(Engine(*tiny_f32), "tiny"), base_url="http://127.0.0.1")
    response = chat.post("/v1/embeddings", json={"input": "x"})
    assert_refused(response.status_code, response.json(), "needs an embedding model")
    response = chat.post("/v1/rerank", json={"query": "q", "documents": ["d"]})
    assert_refused(response.status_code, response.json(), "needs a reranker")
