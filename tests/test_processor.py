"""Prompts: chat template rendering and placeholder expansion against transformers' tokenizer, template
and image processor; the processor's output fed to the model against transformers end to end."""

import json

import numpy as np
import pytest
import torch
from checkpoints import DATA
from compare import FLOAT32, relative_max_diff
from media import picture, write_video
from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer
from transformers import AutoTokenizer, Qwen3VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from mlx_qwen3vl.errors import Qwen3VLError
from mlx_qwen3vl.video import load_video

CONFIG = json.loads((DATA / "preprocessor_config.json").read_text())
IMAGE_PAD, VIDEO_TRIPLE = "<|image_pad|>", "<|vision_start|><|video_pad|><|vision_end|>"


@pytest.fixture(scope="module")
def processor(tiny_f32):
    return tiny_f32[1]


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_checkpoint):
    return AutoTokenizer.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="module")
def hf_image_processor():
    return Qwen2VLImageProcessorPil(
        **{k: v for k, v in CONFIG.items() if k not in ("processor_class", "image_processor_type")}
    )


def reference_image_inputs(messages, images, hf_tokenizer, hf_image_processor, **template_kwargs):
    """transformers 5.24's image path, piece by piece: its chat template rendering, its image processor,
    each <|image_pad|> repeated by the image's token count (Qwen3VLProcessor.replace_image_token), and its
    tokenizer on the whole text. (The processor class itself cannot be built without torchvision.)"""
    text = hf_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, **template_kwargs
    )
    pixels = hf_image_processor(images, return_tensors="np") if images else None
    counts = [int(g.prod()) // 4 for g in pixels["image_grid_thw"]] if images else []
    pieces = text.split(IMAGE_PAD)
    assert len(pieces) == len(counts) + 1
    text = pieces[0] + "".join(IMAGE_PAD * n + piece for n, piece in zip(counts, pieces[1:], strict=True))
    return np.array([hf_tokenizer.encode(text)]), pixels


def image_part(image):
    return {"type": "image", "image": image}


CONVERSATIONS = {
    "one image": lambda a, b: [
        {"role": "user", "content": [image_part(a), {"type": "text", "text": "What is it?"}]}
    ],
    "two images with text between": lambda a, b: [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Compare "},
                image_part(a),
                {"type": "text", "text": " with "},
                image_part(b),
                {"type": "text", "text": " please."},
            ],
        }
    ],
    "system and multi-turn": lambda a, b: [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [image_part(a), {"type": "text", "text": "Colour?"}]},
        {"role": "assistant", "content": "Mostly grey."},
        {"role": "user", "content": [image_part(b), {"type": "text", "text": "And this one? 你好 🙂"}]},
    ],
}


@pytest.mark.parametrize("add_vision_id", [False, True])
@pytest.mark.parametrize("name", CONVERSATIONS)
def test_image_prompt_ids_equal_transformers(
    name, add_vision_id, processor, hf_tokenizer, hf_image_processor
):
    a, b = picture(300, 200, 1), picture(128, 256, 2)
    messages = CONVERSATIONS[name](a, b)
    images = [
        p["image"] for m in messages if isinstance(m["content"], list) for p in m["content"] if "image" in p
    ]
    ids, pixels = reference_image_inputs(
        messages, images, hf_tokenizer, hf_image_processor, add_vision_id=add_vision_id
    )
    ours = processor(messages, add_vision_id=add_vision_id)
    np.testing.assert_array_equal(ours["input_ids"], ids)
    np.testing.assert_array_equal(ours["image_grid_thw"], pixels["image_grid_thw"])
    # The same Pillow resampling on both sides; the normalisation's float32 steps may round apart (a unit
    # in the last place of 1.0 is 1.2e-7; equal here). One grey level is 7.8e-3.
    assert np.abs(ours["pixel_values"] - pixels["pixel_values"]).max() <= 1e-5
    assert ours["pixel_values_videos"] is None and ours["video_grid_thw"] is None


def test_tools_are_rendered_by_the_template(processor, hf_tokenizer):
    tools = [{"type": "function", "function": {"name": "zoom", "parameters": {"type": "object"}}}]
    messages = [{"role": "user", "content": "Zoom in."}]
    text = hf_tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    assert '"name": "zoom"' in text
    expected = hf_tokenizer.encode(text)
    np.testing.assert_array_equal(processor(messages, tools=tools)["input_ids"][0], expected)


def test_plain_string_with_images_and_image_url_parts(processor):
    a = picture(96, 64, 3)
    from_string = processor("Describe.", images=[a])
    from_messages = processor(
        [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": a}},
                    {"type": "text", "text": "Describe."},
                ],
            }
        ]
    )
    np.testing.assert_array_equal(from_string["input_ids"], from_messages["input_ids"])
    np.testing.assert_array_equal(from_string["pixel_values"], from_messages["pixel_values"])


def reference_video_expansion(grid, timestamps, source_fps: float) -> str:
    """transformers' own replace_video_token and timestamps for one video (from the frame indices our
    sampler picked), to put in place of the whole placeholder as 4.57 did (docs/reference.md §7)."""
    stand_in = type("VideoProcessor", (), {"merge_size": 2, "temporal_patch_size": 2})()
    hf = Qwen3VLProcessor.__new__(Qwen3VLProcessor)
    hf.video_processor, hf.vision_start_token, hf.vision_end_token = (
        stand_in,
        "<|vision_start|>",
        "<|vision_end|>",
    )
    hf.video_token = "<|video_pad|>"
    indices = [round(t * source_fps) for t in timestamps]
    metadata = type("Metadata", (), {"fps": source_fps, "frames_indices": indices})()
    return hf.replace_video_token({"video_grid_thw": torch.tensor([grid]), "video_metadata": [metadata]}, 0)


# Text right before a video merges with its first timestamp in the reference's tokenization ("this " +
# "<0.5 seconds>" gives " <" as one token): every layout must give the ids of the whole expanded text.
VIDEO_LAYOUTS = {
    "text ending in a space": ["Watch this ", "V", " What happens?"],
    "colon": ["Watch this:", "V", "What happens?"],
    "period": ["One clip.", "V"],
    "newline": ["Clip below\n", "V", "\nDescribe."],
    "video first": ["V", "Describe."],
    "two videos": ["First: ", "V", " then: ", "V", " differ?"],
    "image then video": ["Picture: ", "I", " and clip: ", "V"],
}


@pytest.mark.parametrize("add_vision_id", [False, True])
@pytest.mark.parametrize("layout", VIDEO_LAYOUTS)
def test_video_prompt_ids_equal_the_whole_expanded_text(
    layout, add_vision_id, processor, hf_tokenizer, hf_image_processor, tmp_path
):
    """Per temporal group `<t seconds><|vision_start|><|video_pad|>...<|vision_end|>`, no outer wrapper
    (docs/reference.md §7), on real files; the ids equal the tokenization of the whole expanded text."""
    clips = [write_video(tmp_path / "a.avi", frames=45, fps=15), write_video(tmp_path / "b.avi", 20, 8)]
    image = picture(128, 96, 5)
    content, videos = [], iter(clips)
    for item in VIDEO_LAYOUTS[layout]:
        if item == "V":
            content.append({"type": "video", "video": str(next(videos))})
        elif item == "I":
            content.append(image_part(image))
        else:
            content.append({"type": "text", "text": item})
    messages = [{"role": "user", "content": content}]
    ours = processor(messages, add_vision_id=add_vision_id)

    text = hf_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, add_vision_id=add_vision_id
    )
    grids = ours["video_grid_thw"] if ours["video_grid_thw"] is not None else []
    for path, grid in zip(clips, grids, strict=False):  # the layout's videos, in order
        video = load_video(path)
        expansion = reference_video_expansion(grid.tolist(), video.timestamps, video.source_fps)
        text = text.replace(VIDEO_TRIPLE, expansion, 1)
    assert VIDEO_TRIPLE not in text
    if ours["image_grid_thw"] is not None:
        pixels = hf_image_processor([image], return_tensors="np")
        text = text.replace(IMAGE_PAD, IMAGE_PAD * (int(pixels["image_grid_thw"][0].prod()) // 4))
    np.testing.assert_array_equal(ours["input_ids"][0], hf_tokenizer.encode(text))


def test_text_before_a_video_merges_with_its_timestamp(processor, tmp_path):
    """The case that splitting at the placeholders got wrong: ' <' is one token of the reference."""
    clip = write_video(tmp_path / "a.avi", frames=45, fps=15)
    content = [{"type": "text", "text": "Watch this "}, {"type": "video", "video": str(clip)}]
    ids = processor([{"role": "user", "content": content}])["input_ids"][0].tolist()
    tokens = processor.tokenizer.convert_ids_to_tokens(ids)
    assert "Ġ<" in tokens


def test_processor_output_gives_transformers_logits(
    tiny_f32, tiny_reference, hf_tokenizer, hf_image_processor
):
    """End to end, float32: our processor + model vs transformers' image processor + model."""
    model, processor = tiny_f32
    image = picture(320, 200, 4)
    messages = CONVERSATIONS["one image"](image, None)
    ids, pixels = reference_image_inputs(messages, [image], hf_tokenizer, hf_image_processor)
    with torch.no_grad():
        reference = tiny_reference(
            input_ids=torch.tensor(ids),
            pixel_values=torch.tensor(pixels["pixel_values"]),
            image_grid_thw=torch.tensor(pixels["image_grid_thw"]),
            mm_token_type_ids=torch.tensor((ids == 151655).astype(np.int64)),
        ).logits.numpy()
    logits = model(**processor(messages))
    assert relative_max_diff(logits, reference) < FLOAT32


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda p, a: p([{"role": "user", "content": "x"}], images=[a]),
         "1 images given but the messages have only 0 image placeholders"),
        (lambda p, a: p([{"role": "user", "content": [{"type": "image"}]}]), "more image placeholders"),
        (lambda p, a: p("Hi", images=[a], temperature=0.5), "unknown option 'temperature'"),
        (lambda p, a: p([{"role": "user", "content": [{"type": "image", "image": a, "fps": 2}]}]),
         "unknown image option 'fps'"),
        (lambda p, a: p([{"content": "no role"}]), "message 1 has no role: must be one of system, user"),
        (lambda p, a: p([{"role": "robot", "content": "x"}]), "message 1 has role 'robot': must be one of"),
        (lambda p, a: p([{"role": "user", "content": 5}]),
         "message 1: content must be a string or a list of parts, got int"),
        (lambda p, a: p([{"role": "user", "content": [5]}]), "message 1, part 1: must be a dict or a string"),
        (lambda p, a: p([{"role": "user", "content": [{"type": "text", "text": 5}]}]),
         "message 1, part 1: text must be a string, got int"),
        (lambda p, a: p([{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}]}]),
         "message 1, part 1: unknown type 'audio' \\(the types are text, image, image_url, video, "
         "video_url\\)"),
        (lambda p, a: p(42), "messages must be a string or a list"),
        (lambda p, a: p("Hi", images=7), "images= must be a list, got int"),
        (lambda p, a: p("Hi", images=[a], min_pixels=0), "min_pixels"),
    ],
)  # fmt: skip
def test_bad_prompts_get_a_clear_error(processor, call, message):
    with pytest.raises(Qwen3VLError, match=message):
        call(processor, picture(64, 64, 5))


def test_tokenizer_streams_with_the_byte_level_detokenizer(processor):
    """The tokenizer is loaded without mlx-lm's extra parse of tokenizer.json, and still gets mlx-lm's
    byte-level streaming detokenizer, which reassembles multi-byte characters split across tokens."""
    tokenizer = processor.tokenizer
    detokenizer = tokenizer.detokenizer
    assert isinstance(detokenizer, BPEStreamingDetokenizer)
    ids = tokenizer.encode("naïve café, 北京 🙂 — done", add_special_tokens=False)
    pieces = []
    for token in ids:
        detokenizer.add_token(token)
        pieces.append(detokenizer.last_segment)
    detokenizer.finalize()
    pieces.append(detokenizer.last_segment)
    assert "".join(pieces) == tokenizer.decode(ids) == "naïve café, 北京 🙂 — done"


def test_a_single_image_or_video_is_a_list_of_one(processor, tmp_path):
    """`images="photo.jpg"` is one image, not a list of characters; the same for one video path, a list
    of frames, a [T, H, W, 3] array."""
    image = picture(64, 48, 3)
    path = tmp_path / "photo.png"
    image.save(path)
    expected = processor("Hi", images=[str(path)])
    for single in (str(path), path, image, np.asarray(image), path.read_bytes()):
        inputs = processor("Hi", images=single)
        np.testing.assert_array_equal(inputs["input_ids"], expected["input_ids"])
        np.testing.assert_array_equal(inputs["pixel_values"], expected["pixel_values"])
    frames = np.stack([np.asarray(picture(64, 64, s)) for s in range(4)])
    video = processor("Hi", videos=[list(frames)], source_fps=2.0)
    for single in (list(frames), frames):
        inputs = processor("Hi", videos=single, source_fps=2.0)
        np.testing.assert_array_equal(inputs["pixel_values_videos"], video["pixel_values_videos"])
    with pytest.raises(Qwen3VLError, match="nowhere.mp4: no such video file"):
        processor("Hi", videos=str(tmp_path / "nowhere.mp4"))


def test_a_bare_string_in_a_content_list_is_a_text_part(processor):
    as_string = processor([{"role": "user", "content": ["Hi", "there"]}])
    parts = [{"type": "text", "text": t} for t in ("Hi", "there")]
    as_parts = processor([{"role": "user", "content": parts}])
    np.testing.assert_array_equal(as_string["input_ids"], as_parts["input_ids"])


def test_every_message_form_of_an_image_or_video_gives_the_same_input(processor, tmp_path):
    """transformers' content keys ("url", "path", "base64" beside "image"; "url", "path" beside "video"),
    OpenAI's image_url (a string or {"url": ...}) and video_url, typeless parts: the same as the plain
    form, pixels and ids."""
    import base64

    image = picture(96, 64, 6)
    path = tmp_path / "photo.png"
    image.save(path)
    encoded = base64.b64encode(path.read_bytes()).decode()
    clip = write_video(tmp_path / "clip.avi", frames=20, fps=8)

    def inputs(part):
        return processor([{"role": "user", "content": [part, {"type": "text", "text": "What?"}]}])

    expected = inputs({"type": "image", "image": str(path)})
    for part in (
        {"type": "image", "url": str(path)},
        {"type": "image", "path": str(path)},
        {"type": "image", "base64": encoded},
        {"type": "image_url", "image_url": f"data:image/png;base64,{encoded}"},
        {"type": "image_url", "image_url": {"url": str(path)}},
        {"image": str(path)},
    ):
        ours = inputs(part)
        np.testing.assert_array_equal(ours["input_ids"], expected["input_ids"], err_msg=str(part)[:60])
        np.testing.assert_array_equal(ours["pixel_values"], expected["pixel_values"])
    expected = inputs({"type": "video", "video": clip})
    for part in (
        {"type": "video", "url": clip},
        {"type": "video", "path": clip},
        {"type": "video_url", "video_url": {"url": clip}},
        {"video": clip},
    ):
        ours = inputs(part)
        np.testing.assert_array_equal(ours["input_ids"], expected["input_ids"], err_msg=str(part))
        np.testing.assert_array_equal(ours["pixel_values_videos"], expected["pixel_values_videos"])
    with pytest.raises(Qwen3VLError, match="base64 image: invalid base64"):
        inputs({"type": "image", "base64": "@@@"})
    with pytest.raises(Qwen3VLError, match="image_url part without a url"):
        inputs({"type": "image_url", "image_url": {}})
