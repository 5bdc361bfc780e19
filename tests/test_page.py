"""The chat page server.py serves at `/`, in a real headless Chromium (tests/browser.py): one browser and
one server (the Thinking variant of the tiny checkpoint, whose answers the tests script) for the module.
The page loads and reaches nothing but its server; an image dropped in is sent and the answer streams in
piece by piece; boxes and points sit where `grounding.parse` puts them on the image as shown; stop
cancels the answer on the server; reasoning stays folded apart; a wrong API key gets one message; a
reload keeps the conversation. Screenshots at two widths go to $MLX_QWEN3VL_SCREENSHOTS (else the test's
temporary directory), for a person to look at."""

from __future__ import annotations

import base64
import http.client
import json
import os
import sys
import time
from pathlib import Path

import pytest
from browser import KEYS, Browser
from media import picture, png_bytes, write_video
from PIL import Image, ImageDraw
from scripted import Scripted, say
from test_server import KEY, Server

from mlx_qwen3vl import grounding
from mlx_qwen3vl.options import DEFAULT_MAX_TOKENS, SamplingOptions
from mlx_qwen3vl.serving.guard import Access

HANG = 40  # seconds: a bound on every wait, so that a hang fails; far above what any takes
GROUNDED = (
    '```json\n[{"bbox_2d": [100, 150, 600, 700], "label": "cat"}, '
    '{"bbox_2d": [550, 80, 950, 500], "label": "dog"}, {"point_2d": [300, 820], "label": "ball"}]\n```'
)
WIDE, NARROW = (1280, 1200), (360, 780)
ENTER, ESCAPE = KEYS["enter"], KEYS["escape"]
SHIFT_ENTER = KEYS["shift"] + KEYS["enter"] + KEYS["release"]


@pytest.fixture(scope="module")
def server(tiny_thinking):
    s = Server(tiny_thinking)
    yield s
    s.close()


@pytest.fixture(scope="module")
def downloads(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def browser(server, downloads):
    try:
        b = Browser(downloads, HANG)
    except RuntimeError as e:
        # On Linux (CI's system) the README asks for Debian's Chromium, and .ci/run installs it: a missing
        # one fails there. On a Mac, which has no such package, the page's tests are skipped, saying why.
        if sys.platform.startswith("linux"):
            pytest.fail(str(e))
        pytest.skip(str(e))
    b.resize(*WIDE)
    b.go(server.url)
    yield b
    b.close()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    folder = os.environ.get("MLX_QWEN3VL_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        return Path(folder)
    return tmp_path_factory.mktemp("screenshots")


def text(browser, css: str) -> str:
    return browser.run(
        "const e = document.querySelector(arguments[0]); return e ? e.textContent : null;", css
    )


def connected(browser) -> None:
    """The page with the right API key, its model's name shown (the key given if the page asks)."""
    asks = "return !document.getElementById('key-form').hidden ? 'asks' : arguments[0] === 'tiny' && 'ready'"
    state = browser.wait(lambda: browser.run(asks, text(browser, "#model")), "the page connected or asking")
    if state == "asks":
        browser.type("#key", KEY, ENTER)
    browser.wait(lambda: text(browser, "#model") == "tiny", "the model's name")


def answered(browser) -> None:
    """Until the answer being streamed is over (the send button back)."""
    browser.wait(lambda: browser.run("return !document.getElementById('send').hidden"), "the answer's end")


def last(browser, css: str) -> str | None:
    return browser.run(
        "return [...document.querySelectorAll(arguments[0])].map((e) => e.textContent).pop();",
        css,
    )


def metrics(server) -> dict:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=HANG)
    connection.request("GET", "/metrics", headers={"Authorization": f"Bearer {KEY}"})
    data = json.loads(connection.getresponse().read())
    connection.close()
    return data


# A PNG given to the page as a user gives it: dropped on the conversation, or pasted into the message.
GIVE = """
const [data, name, how] = arguments;
const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
const files = new DataTransfer();
files.items.add(new File([bytes], name, {type: "image/png"}));
const event = how === "drop"
  ? new DragEvent("drop", {dataTransfer: files, bubbles: true, cancelable: true})
  : new ClipboardEvent("paste", {clipboardData: files, bubbles: true, cancelable: true});
document.querySelector(how === "drop" ? "main" : "#prompt").dispatchEvent(event);
"""

# Every state the last answer's text goes through: the old value of each change of its text, as it is
# made (a MutationObserver's records keep each one, however the browser batches their delivery).
WATCH = """
window.states = [];
new MutationObserver((records) => {
  for (const r of records)
    if (r.type === "characterData" && r.target.parentElement.matches(".assistant > .content"))
      window.states.push(r.oldValue);
}).observe(document.getElementById("conversation"),
  {subtree: true, characterData: true, characterDataOldValue: true});
"""


def test_a_wrong_api_key_gets_one_clear_message(browser):
    browser.wait(lambda: browser.run("return !document.getElementById('key-form').hidden"), "the key form")
    assert "needs its API key" in text(browser, "#notice")
    browser.type("#key", "not-the-key", ENTER)
    browser.wait(lambda: "refused this API key" in (text(browser, "#notice") or ""), "the refusal")
    alerts = browser.run(
        "return [...document.querySelectorAll('[role=alert]')].filter(e => !e.hidden).length"
    )
    assert alerts == 1 and text(browser, "#model") == "mlx-qwen3vl"
    connected(browser)
    assert browser.run("return document.getElementById('notice').hidden")


def test_a_dropped_image_is_sent_and_the_answer_streams_piece_by_piece(browser, server, monkeypatch):
    connected(browser)
    tokenizer = server.engine.processor.tokenizer
    answer = "A red square on a white ground, seen from above."
    say(monkeypatch, tokenizer, "</think>\n\n", answer)
    image = png_bytes(picture(96, 64, 1))
    thumbnails = "return [...document.querySelectorAll('#attachments li')].map((e) => e.textContent)"
    # Pasted, then taken back.
    browser.run(GIVE, base64.b64encode(image).decode(), "pasted.png", "paste")
    browser.wait(lambda: "tokens" in "".join(browser.run(thumbnails)), "the pasted image's thumbnail")
    browser.click("#attachments .remove")
    assert browser.run(thumbnails) == []
    browser.run(GIVE, base64.b64encode(image).decode(), "square.png", "drop")
    # The thumbnail says what the image becomes, as the server's processor reads it.
    expected = server.engine.processor.read_image(image).description
    browser.wait(lambda: expected in (text(browser, "#attachments") or ""), "the thumbnail's description")
    assert len(browser.run(thumbnails)) == 1
    browser.run(WATCH)
    browser.type("#prompt", "Describe", SHIFT_ENTER, "briefly.", ENTER)
    answered(browser)
    assert last(browser, ".user > .content") == "Describe\nbriefly."
    assert browser.run("return document.querySelectorAll('.user img').length") == 1
    final = last(browser, ".assistant > .content")
    assert final == answer
    states = [*browser.run("return window.states"), final]
    # Shown as it came: one change per streamed piece, each state the one before with more text.
    assert states[0] == "" and len(states) >= len(tokenizer.encode(answer)) // 2
    assert all(a != b and b.startswith(a) for a, b in zip(states, states[1:], strict=False))
    assert "tokens/s" in last(browser, ".assistant > .stats")


def test_reasoning_is_folded_apart_and_tool_calls_shown_as_such(browser, server, monkeypatch):
    connected(browser)
    tools = [{"type": "function", "function": {"name": "zoom", "parameters": {"type": "object"}}}]
    browser.run("document.getElementById('tools').value = arguments[0]", json.dumps(tools))
    call = '<tool_call>\n{"name": "zoom", "arguments": {"factor": 2}}\n</tool_call>'
    say(
        monkeypatch,
        server.engine.processor.tokenizer,
        "Let me look closer.",
        "</think>\n\n",
        "Zooming.\n",
        call,
    )
    browser.type("#prompt", "What is it?", ENTER)
    answered(browser)
    browser.run("document.getElementById('tools').value = ''")
    folded = browser.run(
        "const r = [...document.querySelectorAll('.assistant .reasoning')].pop();"
        "return [r.open, r.hidden, r.querySelector('.text').textContent,"
        " r.querySelector('.text').checkVisibility()];"
    )
    assert folded == [False, False, "Let me look closer.", False]  # there, folded
    assert last(browser, ".assistant > .content") == "Zooming."
    assert last(browser, ".assistant .tool-call") == 'Tool call: zoom({"factor": 2})'


def scene(size: tuple[int, int]) -> Image.Image:
    """Sky, grass, and a shape where each thing GROUNDED names is: a picture a person can check."""
    image = Image.new("RGB", size, (190, 220, 245))
    pen = ImageDraw.Draw(image)
    w, h = size
    pen.rectangle((0, h * 0.6, w, h), fill=(120, 175, 95))
    pen.ellipse((0.12 * w, 0.2 * h, 0.58 * w, 0.68 * h), fill=(235, 150, 60))  # the cat
    pen.ellipse((0.57 * w, 0.1 * h, 0.93 * w, 0.48 * h), fill=(140, 100, 70))  # the dog
    pen.ellipse((0.27 * w, 0.79 * h, 0.33 * w, 0.85 * h), fill=(220, 40, 40))  # the ball
    return image


def test_boxes_and_points_sit_where_grounding_parse_puts_them(
    browser, server, monkeypatch, tmp_path, screenshots
):
    connected(browser)
    say(monkeypatch, server.engine.processor.tokenizer, "</think>\n\n", GROUNDED)
    size = (640, 480)
    path = tmp_path / "scene.png"
    scene(size).save(path)
    # A pixel budget from the options fold: the model sees the image smaller, the marks are still
    # placed on the image as the user gave it.
    budget = 200 * 150
    browser.run("document.getElementById('options').open = true")
    browser.type("#max-pixels", str(budget))
    browser.type("#files", str(path))  # the file picker
    expected = server.engine.processor.read_image(path, max_pixels=budget).description
    browser.wait(lambda: expected in (text(browser, "#attachments") or ""), "the thumbnail's description")
    browser.type("#prompt", "Locate the cat, the dog and the ball.", ENTER)
    answered(browser)
    browser.run(
        "const o = document.getElementById('options'); o.open = false; o.querySelector('input').value = ''"
    )
    found = grounding.parse(GROUNDED, size)
    for width, height in (WIDE, NARROW):
        browser.resize(width, height)
        browser.wait(lambda: marks_placed(browser, found, size), f"the marks placed at {width} px")
        browser.screenshot(screenshots / f"page-{width}px.png")
    browser.resize(*WIDE)
    # Hovering a label highlights its mark alone.
    browser.run("document.querySelectorAll('.grounding')[0].scrollIntoView()")
    browser.hover(".grounding .tag[data-index='1']")
    hot = browser.run("return [...document.querySelectorAll('.grounding .hot')].map(e => e.dataset.index)")
    assert hot == ["1", "1"]
    # The drawn image, downloaded: the image at its own size, the first box's edge in its colour.
    browser.click(".grounding figcaption button")
    file = browser.wait(lambda: next(iter(downloads_of(browser)), None), "the download")
    drawn = Image.open(file).convert("RGB")
    x1, y1, x2, y2 = (round(v) for v in found[0].box)
    assert drawn.size == size and drawn.getpixel((x1, (y1 + y2) // 2)) == (0xE6, 0x19, 0x4B)


def downloads_of(browser) -> list[Path]:
    return list(browser.downloads.glob("grounding*.png"))


def marks_placed(browser, found, size) -> bool:
    """Every mark and box label where `found` (pixels of the image) puts it on the image as shown, within
    a pixel: boxes by their edges, points by their centre."""
    shown = browser.run(
        """
        const figure = [...document.querySelectorAll('.grounding')].pop();
        const image = figure.querySelector('img').getBoundingClientRect();
        const at = (e) => { const r = e.getBoundingClientRect();
          return [r.left - image.left, r.top - image.top, r.right - image.left, r.bottom - image.top]; };
        return {width: image.width, height: image.height,
          marks: [...figure.querySelectorAll('.mark')].map(at),
          tags: [...figure.querySelectorAll('.tag')].map((e) => [e.textContent, ...at(e)])};
        """
    )
    if not shown["width"]:
        return False
    sx, sy = shown["width"] / size[0], shown["height"] / size[1]
    assert len(shown["marks"]) == len(found) == 3
    for d, mark, tag in zip(found, shown["marks"], shown["tags"], strict=True):
        if d.box:
            expected = [d.box[0] * sx, d.box[1] * sy, d.box[2] * sx, d.box[3] * sy]
            got = mark
            # The label sits on the box's top-left corner, above it.
            if tag[0] != d.label or abs(tag[1] - expected[0]) > 1 or abs(tag[4] - expected[1]) > 1:
                return False
        else:
            expected = [d.point[0] * sx, d.point[1] * sy]
            got = [(mark[0] + mark[2]) / 2, (mark[1] + mark[3]) / 2]
        if any(abs(a - b) > 1 for a, b in zip(got, expected, strict=True)):
            return False
    return True


class Slowly(Scripted):
    """A scripted answer at a few tokens a second at most, so that the stop comes mid-answer on any
    machine."""

    def __call__(self, logprobs):
        time.sleep(0.02)
        return super().__call__(logprobs)


def test_stop_cancels_the_answer_on_the_server(browser, server, monkeypatch):
    connected(browser)
    tokens = server.engine.processor.tokenizer.encode("</think>\n\n" + " word" * (2 * DEFAULT_MAX_TOKENS))
    monkeypatch.setattr(SamplingOptions, "sampler", lambda self: Slowly(tokens))
    before = metrics(server)["tokens_generated"]
    browser.type("#prompt", "Count words.", ENTER)
    browser.wait(lambda: (last(browser, ".assistant > .content") or "").count("word") >= 3, "the answer")
    browser.type("#prompt", ESCAPE)
    answered(browser)
    browser.wait(lambda: metrics(server)["answers_running"] == 0, "the answer to end on the server")
    generated = metrics(server)["tokens_generated"] - before
    # Cut short (a full answer is DEFAULT_MAX_TOKENS tokens), and no more come.
    assert 3 <= generated < DEFAULT_MAX_TOKENS
    assert metrics(server)["tokens_generated"] - before == generated
    assert last(browser, ".assistant > .stats").startswith("stopped")


def contrast(colours: list[str]) -> float:
    """WCAG 2's contrast ratio of two CSS rgb() colours."""

    def luminance(css: str) -> float:
        channels = [int(v) / 255 for v in css[css.index("(") + 1 : -1].split(",")[:3]]
        r, g, b = (c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in channels)
        return 0.2126 * r + 0.7152 * g + 0.0722 * b

    high, low = sorted(map(luminance, colours), reverse=True)
    return (high + 0.05) / (low + 0.05)


def test_text_reads_in_light_and_dark_mode(browser, screenshots):
    """Text on its background at WCAG AA's 4.5:1 at least, in the light and the dark scheme (whichever
    the system asks for)."""
    pairs = """return [...document.querySelectorAll(arguments[0])].map((e) => {
      const s = getComputedStyle(e); return [s.color, s.backgroundColor]; });"""
    parts = "header, .message.user, .message.assistant, #bottom, #prompt"
    backgrounds = {}
    for scheme in ("dark", "light"):
        browser.color_scheme(scheme)
        colours = browser.run(pairs, parts)
        assert len(colours) >= 5 and all(contrast(pair) >= 4.5 for pair in colours), colours
        backgrounds[scheme] = colours[0][1]
        if scheme == "dark":
            browser.resize(*NARROW)
            browser.screenshot(screenshots / "page-360px-dark.png")
            browser.resize(*WIDE)
    assert backgrounds["dark"] != backgrounds["light"]


def test_a_reload_keeps_the_conversation_and_new_chat_starts_another(browser, server):
    connected(browser)
    messages = "return [...document.querySelectorAll('.message')].map((m) => m.textContent)"
    before = browser.run(messages)
    assert len(before) >= 2
    browser.refresh()
    connected(browser)  # the key is kept for the tab: no question asked
    assert browser.run("return document.getElementById('key-form').hidden")
    assert browser.run(messages) == before
    assert browser.run("return document.querySelectorAll('.grounding .mark').length") == 3
    browser.click("#new-chat")
    assert browser.run(messages) == []
    browser.run(
        "const s = document.getElementById('chats');"
        "s.selectedIndex = 1; s.dispatchEvent(new Event('change'));"
    )
    assert browser.run(messages) == before


def test_the_page_reaches_nothing_but_its_server(browser, server):
    """Every request of every test above, and of a fresh load: to the server, or data: and blob: URLs."""
    browser.go(server.url)
    connected(browser)
    urls = browser.requested_urls()
    paths = {url.removeprefix(server.url) for url in urls if url.startswith(server.url + "/")}
    assert {"/", "/page/page.js", "/page/page.css", "/v1/models"} <= paths
    assert [u for u in urls if not u.startswith((server.url + "/", "data:", "blob:"))] == []
    # Nothing the page does is refused by its own policy (an inline style or script would be).
    assert [m for m in browser.console() if "Content Security Policy" in m] == []


# ---- the server's side, without the browser --------------------------------------------------------------


def request(server, method: str, path: str, body=None, **headers):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=HANG)
    data = None if body is None else json.dumps(body)
    connection.request(method, path, body=data, headers={"Content-Type": "application/json", **headers})
    response = connection.getresponse()
    out = response.status, dict(response.getheaders()), response.read()
    connection.close()
    return out


def test_the_page_is_served_without_the_key_under_its_policy_and_the_api_is_not(server):
    status, headers, body = request(server, "GET", "/")
    policy = headers["content-security-policy"]
    assert status == 200 and b'src="/page/page.js"' in body
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy and "script-src 'self'" in policy
    assert "http" not in policy  # no other host named
    status, headers, _ = request(server, "GET", "/page/page.js")
    assert status == 200 and headers["content-type"].startswith("text/javascript")
    assert request(server, "GET", "/page/../server.py")[0] in (401, 404)
    assert request(server, "GET", "/v1/models")[0] == 401
    assert request(server, "GET", "/metrics")[0] == 401


def data_url(data: bytes, kind: str) -> str:
    return f"data:{kind};base64," + base64.b64encode(data).decode()


def test_the_server_says_what_an_image_or_a_video_becomes(server, tmp_path):
    auth = {"Authorization": f"Bearer {KEY}"}
    processor = server.engine.processor
    image = png_bytes(picture(200, 100, 3))
    part = {"type": "image_url", "image_url": {"url": data_url(image, "image/png")}, "max_pixels": 20000}
    status, _, body = request(server, "POST", "/v1/media", part, **auth)
    item = processor.read_image(image, max_pixels=20000)
    t, h, w = item.grid_thw
    assert status == 200 and json.loads(body) == {
        "kind": "image",
        "description": item.description,
        "tokens": t * h * w // processor.image_settings.merge_size**2,
    }
    video = write_video(tmp_path / "clip.avi", frames=16)
    part = {"type": "video_url", "video_url": {"url": data_url(Path(video).read_bytes(), "video/x-msvideo")}}
    status, _, body = request(server, "POST", "/v1/media", part | {"fps": 4}, **auth)
    item = processor.read_media("video", video, {"fps": 4})
    assert status == 200 and json.loads(body)["description"] == item.description
    status, _, body = request(server, "POST", "/v1/media", part | {"fps": -1}, **auth)
    assert status == 400 and "fps" in json.loads(body)["error"]["message"]
    status, _, body = request(server, "POST", "/v1/media", {"type": "text", "text": "?"}, **auth)
    assert status == 400 and "one image_url or video_url" in json.loads(body)["error"]["message"]


def test_the_server_returns_the_parsed_detections_with_the_answer(server, monkeypatch):
    say(monkeypatch, server.engine.processor.tokenizer, "</think>\n\n", GROUNDED)
    first, last = (png_bytes(picture(*size, 3)) for size in ((200, 100), (120, 90)))
    parts = [{"type": "image_url", "image_url": {"url": data_url(i, "image/png")}} for i in (first, last)]
    auth = {"Authorization": f"Bearer {KEY}"}
    messages = [{"role": "user", "content": [*parts, {"type": "text", "text": "Locate them."}]}]
    status, _, body = request(server, "POST", "/v1/chat/completions", {"messages": messages}, **auth)
    # On the conversation's last image, in its pixels.
    expected = [
        {"image": 1, "size": [120, 90], "label": d.label}
        | {"box": d.box and list(d.box), "point": d.point and list(d.point)}
        for d in grounding.parse(GROUNDED, (120, 90))
    ]
    assert status == 200 and json.loads(body)["choices"][0]["message"]["detections"] == expected
    # No image: nothing to locate on, no field.
    point = '{"point_2d": [10, 20]}'
    say(monkeypatch, server.engine.processor.tokenizer, "</think>\n\n", point)
    messages = [{"role": "user", "content": "Locate them."}]
    status, _, body = request(server, "POST", "/v1/chat/completions", {"messages": messages}, **auth)
    message = json.loads(body)["choices"][0]["message"]
    assert status == 200 and message["content"] == point and "detections" not in message


def test_the_page_is_its_own_origin_under_any_address_of_the_server():
    everywhere = Access(bound="0.0.0.0")
    assert everywhere.origin_allowed("http://192.168.1.5:8080", "192.168.1.5:8080")
    assert not everywhere.origin_allowed("http://192.168.1.5:9090", "192.168.1.5:8080")
    assert not everywhere.origin_allowed("http://192.168.1.5:8080")
    # A name the server only takes because it takes any ("*") may be one rebound to it: not its own.
    assert not Access(hosts=("*",)).origin_allowed("http://rebound.example:8080", "rebound.example:8080")
    assert Access(hosts=("chat.example",)).origin_allowed("https://chat.example", "chat.example")
