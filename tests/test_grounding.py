"""Grounding answers (boxes and points on Qwen3-VL's 0-1000 scale) read into pixels of the original image,
drawn on a copy of it, and saved by chat.py. The answers are written by hand in each format the Qwen3-VL
cookbooks show (see mlx_qwen3vl/grounding.py), broken ways included: the tiny test model answers gibberish.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from terminal import GREEDY, LOAD_TIMEOUT, PROMPT, ROOT, run_chat

from mlx_qwen3vl import Qwen3VLError, grounding
from mlx_qwen3vl.grounding import PALETTE, Detection, Drawings, draw, parse

SIZE = (640, 480)  # width, height: not square, so x and y scales differ

FENCED = """Here are the animals:
```json
[
\t{"bbox_2d": [100, 250, 500, 750], "label": "cat"},
\t{"bbox_2d": [600, 0, 1000, 1000], "label": "dog"},
\t{"point_2d": [250, 500], "label": "ball"}
]
```
Anything else?"""
EXPECTED = [
    Detection("cat", box=(64.0, 120.0, 320.0, 360.0)),
    Detection("dog", box=(384.0, 0.0, 640.0, 480.0)),
    Detection("ball", point=(160.0, 240.0)),
]


# ---- parsing ------------------------------------------------------------------------------------------


def test_a_fenced_list_maps_the_1000_scale_to_pixels_of_a_non_square_image():
    assert parse(FENCED, SIZE) == EXPECTED
    assert parse(FENCED, (1000, 2000))[0].box == (100.0, 500.0, 500.0, 1500.0)


def test_one_bare_object_in_a_sentence():
    text = 'The cat is here: {"bbox_2d": [0, 0, 1000, 1000], "label": "cat"}. It is asleep.'
    assert parse(text, SIZE) == [Detection("cat", box=(0.0, 0.0, 640.0, 480.0))]


def test_several_json_blocks_and_a_wrapper_object():
    text = (
        '```json\n[{"point_2d": [500, 500], "label": "a"}]\n```\nand also\n'
        '```json\n{"objects": [{"bbox_2d": [0, 0, 500, 500], "label": "b"}]}\n```'
    )
    assert parse(text, (100, 200)) == [
        Detection("a", point=(50.0, 100.0)),
        Detection("b", box=(0.0, 0.0, 50.0, 100.0)),
    ]


@pytest.mark.parametrize("cut", ['{"bbox_2d": [10, 20, 3', '{"point_2d": [250', '{"bbox_2d', ",\n\t{", ""])
def test_a_list_cut_off_by_max_tokens_keeps_its_complete_entries(cut):
    complete = '```json\n[\n\t{"bbox_2d": [100, 250, 500, 750], "label": "cat"},\n\t{"point_2d": [250, 500]}'
    assert parse(complete + cut, SIZE) == [EXPECTED[0], Detection("", point=(160.0, 240.0))]


def test_a_broken_entry_costs_only_itself():
    # As in the omni_recognition cookbook's output: a stray "{" before one entry, and a name in "names".
    text = """```json
[
\t{"bbox_2d": [0, 52, 477, 999], "names": {"zh": "富冈义勇", "en": "Giyu Tomioka"}},
\t{
\t{"bbox_2d": [649, 116, 794, 643], "name_en": "Rice", "name_zh": "米饭"},
\t{"bbox_2d": [1, 2, 3], "label": "three numbers"},
\t{"bbox_2d": ["12", 20, 30, 40.5], "label": 7}
]
```"""
    found = parse(text, (1000, 1000))
    assert [d.label for d in found] == ["富冈义勇", "Rice", "7"]  # label, else the first text field
    assert found[1].attributes == {"name_en": "Rice", "name_zh": "米饭"}  # what the model gave is kept
    assert found[2].box == (12.0, 20.0, 30.0, 40.5)


def test_out_of_range_values_are_clamped_and_reversed_corners_ordered():
    text = '[{"bbox_2d": [1200, 900, -50, 100], "label": "x"}, {"point_2d": [-10, 1500]}]'
    box, point = parse(text, SIZE)
    assert box.box == (0.0, 48.0, 640.0, 432.0)
    assert point.point == (0.0, 480.0)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "I cannot see any cat in this picture.",
        "```json\n[{not json}]\n```",
        "[100, 200, 300, 400]",  # coordinates without a key: no way to tell them from any other numbers
        '{"bbox_2d": [1, 2, 3]}',
        '{"bbox_2d": [1, 2, 3, "four"]}',
        '{"bbox_2d": [NaN, 2, 3, 4]}',
        '{"point_2d": [true, 2]}',
        '{"bbox_2d": {"x1": 1}}',
        "{" * 5000,
        "[" * 5000,
        "<p>no boxes here</p> <!-- Image (1, 2) -->",
    ],
    ids=["empty", "words", "not json", "bare list", "3 numbers", "a word", "nan", "boolean", "a dict",
         "deep braces", "deep brackets", "html without boxes"],
)  # fmt: skip
def test_text_that_locates_nothing_gives_an_empty_list(text):
    assert parse(text, SIZE) == []


def test_a_thinking_models_draft_is_not_the_answer():
    draft = 'Maybe {"bbox_2d": [0, 0, 10, 10], "label": "draft"}?'
    text = draft + '</think>\n{"point_2d": [500, 500], "label": "cat"}'
    assert parse(text, SIZE) == [Detection("cat", point=(320.0, 240.0))]


@pytest.mark.parametrize("size", [(0, 480), (640,), "640x480", (640.0, 480), None, (True, 480)])
def test_a_bad_image_size_is_one_clear_error(size):
    with pytest.raises(Qwen3VLError, match=r"^image_size must be \(width, height\) in whole pixels > 0, got"):
        parse(FENCED, size)


def test_qwenvl_html_elements_with_their_class_or_tag_and_text():
    # The document_parsing cookbook's "qwenvl html", cut off inside the last paragraph.
    text = """```html
<html><body><div class="image" data-bbox="104 29 455 75"></div>
<h2 data-bbox="310 94 658 132">Qwen2.5 <b>Technical</b> Report</h2>
<div class="table" data-bbox="108,298,386,446"><table><tr><td>a</td><td>b</td></tr></table></div>
<p style="x" data-bbox="99 339 869 565">In this report, we"""
    found = parse(text, (1000, 2000))
    assert [(d.label, d.box) for d in found] == [
        ("image", (104.0, 58.0, 455.0, 150.0)),
        ("h2", (310.0, 188.0, 658.0, 264.0)),
        ("table", (108.0, 596.0, 386.0, 892.0)),
        ("p", (99.0, 678.0, 869.0, 1130.0)),
    ]
    assert found[1].attributes == {"tag": "h2", "text": "Qwen2.5 Technical Report"}
    assert found[2].attributes["text"] == "a b"
    assert found[3].attributes == {"tag": "p", "text": "In this report, we", "style": "x"}


def test_qwenvl_markdown_comments():
    text = "# Title\n<!-- Image (50, 100, 450, 300) -->\n![image](x)\n<!-- Table (50,350, 950 ,600) -->\n|a|"
    assert parse(text, (2000, 1000)) == [
        Detection("Image", box=(100.0, 100.0, 900.0, 300.0)),
        Detection("Table", box=(100.0, 350.0, 1900.0, 600.0)),
    ]


def test_xml_points_each_pair_labelled_by_alt_or_text():
    text = (
        'Here: <points x1="100" y1="200" x2="500.5" y2="1000" alt="cakes">two cakes</points>, '
        '<point x=\'250\' y=\'0\'>the knife</point> and <POINTS X1="1200" Y1="-5" alt="far"/>'
    )
    assert parse(text, (2000, 1000)) == [
        Detection("cakes", point=(200.0, 200.0), attributes={"text": "two cakes"}),
        Detection("cakes", point=(1001.0, 1000.0), attributes={"text": "two cakes"}),
        Detection("the knife", point=(500.0, 0.0)),
        Detection("far", point=(2000.0, 0.0)),
    ]


@pytest.mark.parametrize(
    "text",
    [
        '<points x1="100" y1="20',  # cut off inside the element
        '<points x1="ten" y1="20">x</points>',  # not a number
        '<points x1="100">no y</points>',  # a pair without its y
        '<pointer x="1" y="2">not a point</pointer>',
    ],
)
def test_broken_xml_points_give_nothing(text):
    assert parse(text, SIZE) == []


def test_describe_counts_boxes_and_points():
    assert grounding.describe(EXPECTED) == "2 boxes and 1 point"
    assert grounding.describe(EXPECTED[:1]) == "1 box"
    assert grounding.describe([]) == "nothing"


def test_the_module_is_reached_from_the_package():
    import mlx_qwen3vl

    assert mlx_qwen3vl.grounding.parse is parse and "grounding" in dir(mlx_qwen3vl)


# ---- drawing ------------------------------------------------------------------------------------------


def luma(rgb) -> float:
    r, g, b = (float(c) for c in rgb[:3])
    return 0.299 * r + 0.587 * g + 0.114 * b


def background(shade: int, size=SIZE) -> Image.Image:
    return Image.new("RGB", size, (shade, shade, shade))


@pytest.mark.parametrize("shade", [0, 255], ids=["black", "white"])
def test_boxes_are_drawn_along_their_edges_in_their_labels_colour(shade):
    image = background(shade)
    pixels = np.asarray(draw(image, parse(FENCED, SIZE)))
    cat, dog = PALETTE[0], PALETTE[1]
    # cat: (64, 120)-(320, 360); the line runs just inside the edges. The label sits above the box.
    assert (pixels[125:355, 64] == cat).all() and (pixels[125:355, 319] == cat).all()  # left, right
    assert (pixels[120, 64:320] == cat).all() and (pixels[359, 64:320] == cat).all()  # top, bottom
    assert (pixels[130:200, 80:300] == shade).all()  # inside untouched
    assert (pixels[5:475, 639] == dog).all()  # dog reaches the right edge: its line is the last column


def test_a_label_keeps_its_colour_and_labels_get_different_ones():
    text = '[{"bbox_2d": [0, 300, 200, 500], "label": "a"}, {"bbox_2d": [300, 300, 500, 500], "label": "b"},'
    text += '{"bbox_2d": [600, 300, 800, 500], "label": "a"}]'
    pixels = np.asarray(draw(background(128), parse(text, SIZE)))
    assert (pixels[200, 0] == PALETTE[0]).all() and (pixels[200, 384] == PALETTE[0]).all()
    assert (pixels[200, 192] == PALETTE[1]).all()


@pytest.mark.parametrize("shade", [0, 255], ids=["black", "white"])
def test_every_colour_stands_out_on_dark_and_light_images(shade):
    """A light colour alone vanishes on white, a dark one on black: each mark has a halo of the opposite
    brightness, and each label's text contrasts with its block."""
    box = '{{"bbox_2d": [{left}, 400, {right}, 600], "label": "L{i}"}}'
    entries = ",".join(box.format(left=40 + 80 * i, right=100 + 80 * i, i=i) for i in range(len(PALETTE)))
    pixels = np.asarray(draw(background(shade), parse(f"[{entries}]", SIZE)))
    for i in range(len(PALETTE)):
        x1, y = round((40 + 80 * i) * 0.64), 240
        edge = pixels[y, x1 - 3 : x1 + 3]  # across the left edge: halo and line
        assert max(abs(luma(p) - shade) for p in edge) > 100, (i, edge)
        block = pixels[int(400 * 0.48) - 16 : int(400 * 0.48) - 2, x1 : x1 + 20].reshape(-1, 3)
        lumas = [luma(p) for p in block]
        assert max(lumas) - min(lumas) > 100, i  # text and its block: light on dark or dark on light


def test_points_are_drawn_as_dots_with_a_halo():
    pixels = np.asarray(draw(background(0), [Detection("ball", point=(160.0, 240.0))]))
    row = pixels[240, 150:161]  # from outside the dot to its centre (radius 4 at this size)
    assert (row[0] == 0).all() and (row[7:] == PALETTE[0]).all()
    assert any((p == 255).all() for p in row[1:7])  # a white halo around the (dark) red dot


def test_drawing_returns_a_new_picture_and_leaves_the_original_untouched(tmp_path):
    image = Image.new("RGB", SIZE, (10, 20, 30))
    before = image.tobytes()
    drawn = draw(image, parse(FENCED, SIZE))
    assert drawn is not image and drawn.size == image.size and drawn.mode == "RGB"
    assert image.tobytes() == before and drawn.tobytes() != before
    assert draw(image, []).tobytes() == before  # nothing located: an identical copy
    image.save(tmp_path / "photo.png")
    assert draw(tmp_path / "photo.png", parse(FENCED, SIZE)).tobytes() == drawn.tobytes()  # a path works too


def test_lines_grow_with_the_image():
    def line_width(side):
        pixels = np.asarray(draw(background(0, (side, side)), [Detection("", box=(0.0, 0.0, side, side))]))
        return int((pixels[side // 2, : side // 2] == PALETTE[0]).all(axis=1).sum())

    assert line_width(300) == 2 and line_width(2000) == 8


# ---- chat.py ------------------------------------------------------------------------------------------


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "my photo.png"
    background(255).save(path)
    return path


def test_an_answer_about_an_image_is_saved_drawn_and_can_be_saved_again(photo, tmp_path):
    drawings = Drawings(tmp_path / "out")
    drawings.asked([str(photo)])
    drawings.asked([])  # a follow-up question without an image is still about the photo
    path, what = drawings.answered(FENCED)
    assert path == tmp_path / "out" / "my_photo-grounding.png"
    assert what == f"2 boxes and 1 point on {photo}"
    saved = np.asarray(Image.open(path))
    assert saved.shape == (480, 640, 3) and (saved[125:355, 64] == PALETTE[0]).all()
    again, _ = drawings.save()
    assert again == tmp_path / "out" / "my_photo-grounding-2.png"  # never overwrites
    assert drawings.answered("The cat is asleep.") is None  # no boxes: the last drawing stays
    assert drawings.save(tmp_path / "other")[0] == tmp_path / "other" / "my_photo-grounding.png"


def test_nothing_to_draw_without_an_image_or_without_boxes(photo, tmp_path):
    drawings = Drawings(tmp_path)
    assert drawings.answered(FENCED) is None  # no image in the conversation
    drawings.asked([str(photo)])
    assert drawings.answered("A white square.") is None
    nothing = "^nothing to draw: no answer so far has boxes or points on an image$"
    with pytest.raises(Qwen3VLError, match=nothing):
        drawings.save()
    drawings.answered(FENCED)
    drawings.asked([], ["clip.mp4"])  # a video question: its answer is about the video's frames
    assert drawings.answered(FENCED) is None
    drawings.clear()  # a new conversation forgets the last drawing
    with pytest.raises(Qwen3VLError, match="^nothing to draw"):
        drawings.save()
    assert sorted(tmp_path.glob("*.png")) == [tmp_path / "my photo.png", tmp_path / "my_photo-grounding.png"]
    assert Drawings(None).answered(FENCED) is None  # no folder: remembered, not saved


class ScriptedSession:
    """What chat.py's `ask` needs of a ChatSession, answering a fixed text (the tiny model's answers
    never locate anything)."""

    def __init__(self, answer: str):
        self.answer, self.messages = answer, []

    def ask(self, question, images=(), videos=(), progress=None, **options):
        self.messages += [{"role": "user", "content": question}]
        self.messages += [{"role": "assistant", "content": self.answer}]
        yield type("Response", (), {"text": self.answer})()


def test_chat_saves_the_picture_of_an_answer_and_names_the_file(photo, tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    import chat

    drawings = Drawings(tmp_path)
    chat.ask(ScriptedSession(FENCED), "Where are they?", {"images": [str(photo)], "videos": []}, {}, drawings)
    out, err = capsys.readouterr()
    assert out == FENCED + "\n"
    assert err == f"drew 2 boxes and 1 point on {photo}: {tmp_path / 'my_photo-grounding.png'}\n"
    assert (tmp_path / "my_photo-grounding.png").is_file()
    chat.ask(ScriptedSession("No."), "And now?", {"images": [], "videos": []}, {}, drawings)
    assert capsys.readouterr().err == ""


@pytest.mark.slow
def test_chat_one_shot_draw_saves_nothing_when_nothing_is_located(tiny_checkpoint, red_image, tmp_path):
    folder = tmp_path / "drawings"
    args = ("--model", str(tiny_checkpoint), "--image", str(red_image), "--draw", str(folder), *GREEDY)
    result = run_chat(tmp_path, *args, "--prompt", "Locate the red square.")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() and "drew" not in result.stderr
    assert not folder.exists()


@pytest.mark.slow
def test_chat_draw_command_says_when_there_is_nothing_to_draw(terminal, tiny_checkpoint, red_image, tmp_path):
    chat = terminal("--model", str(tiny_checkpoint), "--draw", str(tmp_path / "drawings"), *GREEDY)
    chat.expect(PROMPT, timeout=LOAD_TIMEOUT)
    chat.send(b"/help\r")
    assert "/draw [DIR]" in chat.expect(PROMPT)
    chat.send(b"/draw\r")
    assert "error: nothing to draw: no answer so far has boxes or points on an image" in chat.expect(PROMPT)
    chat.send(f"/image {red_image}\r".encode())
    chat.expect(PROMPT)
    chat.send(b"Locate the red square.\r")
    chat.expect(PROMPT)
    chat.send(b"/draw\r")  # the tiny model's answer locates nothing
    assert "nothing to draw" in chat.expect(PROMPT)
    chat.send(b"/quit\r")
    assert chat.exit_code() == 0
    assert not (tmp_path / "drawings").exists()
