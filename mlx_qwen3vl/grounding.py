"""What a "locate / detect / point to" answer found, in pixels of the original image, and a picture of it.

The formats, as Qwen's cookbooks (github.com/QwenLM/Qwen3-VL, `cookbooks/`) show and parse them:

- `2d_grounding.ipynb`: "Qwen3-VL's default coordinate system has been changed from the absolute
  coordinates used in Qwen2.5-VL to relative coordinates ranging from 0 to 1000". Answers are JSON, usually
  fenced as ```json, a list of `{"bbox_2d": [x1, y1, x2, y2], "label": "cat"}`; points are
  `{"point_2d": [x, y], "label": ...}`. The cookbook maps a value `v` to `v / 1000 * width` (or height) of
  the image as loaded, swaps reversed corners, and recovers an answer cut short by cutting it after the
  last complete entry.
- `spatial_understanding.ipynb` and `omni_recognition.ipynb`: the same `point_2d` and `bbox_2d` entries;
  other keys carry the name when there is no `label` (`"name_en"`, `"names": {...}`).
- `document_parsing.ipynb` ("qwenvl html"): HTML whose elements carry `data-bbox="x1 y1 x2 y2"` on the
  same 0-1000 scale, e.g. `<div class="text" data-bbox="91 101 346 127">...</div>`. "qwenvl markdown":
  Markdown where each image and table is preceded by a comment `<!-- Image (x1, y1, x2, y2) -->` or
  `<!-- Table (x1, y1, x2, y2) -->`.
- XML points, the pointing format of Qwen2.5-VL's `spatial_understanding.ipynb` that prompts asking for
  "XML format <points x y>object</points>" still get: `<points x1="..." y1="..." x2="..." y2="..."
  alt="label">phrase</points>`, one or more numbered coordinate pairs, and the single `<point x="..."
  y="..." alt="...">`. Qwen2.5-VL's values were absolute pixels of the resized input; Qwen3-VL's
  coordinates are relative everywhere, so these are read on the same 0-1000 scale as the JSON ones.

`ocr.ipynb` and `mobile_agent.ipynb` divide by 999 instead of 1000 ("the screen's resolution is
999x999"); the grounding and document cookbooks divide by 1000, which this module follows: the two differ
by 0.1%, under one pixel on images up to 1,000 pixels wide.

`parse` never raises for the answer's text: text that locates nothing, or that is not JSON or HTML at all,
gives an empty list (a model that answered in words is not an error); only a bad `image_size` raises.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from html.parser import HTMLParser
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .errors import Qwen3VLError
from .image import load_image

SCALE = 1000  # coordinates run from 0 to SCALE across the image, whatever its size
BOX_KEY, POINT_KEY = "bbox_2d", "point_2d"


@dataclass(frozen=True)
class Detection:
    """One thing located: `box` (x1, y1, x2, y2) or `point` (x, y) in pixels of the original image,
    `label`, and the other fields the model gave (`attributes`, e.g. an HTML element's `text`)."""

    label: str
    box: tuple[float, float, float, float] | None = None
    point: tuple[float, float] | None = None
    attributes: dict = field(default_factory=dict)


# ---- parsing ------------------------------------------------------------------------------------------


def parse(text: str, image_size: tuple[int, int]) -> list[Detection]:
    """Everything `text` locates, in pixels of an image of `image_size` (width, height): the original
    image as the model saw it (EXIF orientation applied, as `image.load_image` gives it), before the
    processor's resizing. JSON entries first, then HTML elements, Markdown comments and XML points, each in
    order."""
    width, height = _checked_size(image_size)
    answer = text.rpartition("</think>")[2]  # a thinking model's reasoning may hold draft coordinates
    found = [
        *_json_entries(answer),
        *_html_elements(answer),
        *_markdown_comments(answer),
        *_xml_points(answer),
    ]
    return [_in_pixels(*entry, width, height) for entry in found]


def _checked_size(image_size) -> tuple[int, int]:
    try:
        width, height = image_size
        valid = all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (width, height))
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise Qwen3VLError(f"image_size must be (width, height) in whole pixels > 0, got {image_size!r}")
    return width, height


def _numbers(value, count: int) -> tuple[float, ...] | None:
    """`count` finite numbers (numeric strings too), or None."""
    if not isinstance(value, (list, tuple)) or len(value) != count:
        return None
    try:
        numbers = tuple(float(v) for v in value if not isinstance(v, bool))
    except (TypeError, ValueError):
        return None
    return numbers if len(numbers) == count and all(map(math.isfinite, numbers)) else None


def _json_entries(text: str) -> Iterator[tuple]:
    """Each JSON object holding `bbox_2d` or `point_2d`, wherever it is: fenced or bare, alone, in a list,
    or in several blocks. Objects are read one by one, so a list cut off by max_tokens keeps its complete
    entries, and one broken entry costs only itself."""
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start != -1:
        end = start + 1  # not an entry: look inside it, a wrapper object may hold the entries
        try:
            value, stop = decoder.raw_decode(text, start)
        except (ValueError, RecursionError):
            value = None
        if isinstance(value, dict):
            box, point = _numbers(value.get(BOX_KEY), 4), _numbers(value.get(POINT_KEY), 2)
            if box or point:
                rest = {k: v for k, v in value.items() if k not in (BOX_KEY, POINT_KEY, "label")}
                yield _entry_label(value, rest), box, point, rest
                end = stop
        start = text.find("{", end)


def _entry_label(entry: dict, rest: dict) -> str:
    """`label`, else the first other text field, one level of nesting included (the cookbooks'
    `name_en`, `text_content`, `"names": {"en": ...}`)."""
    label = entry.get("label")
    if isinstance(label, (str, int, float)) and not isinstance(label, bool) and str(label).strip():
        return str(label).strip()
    values = [w for v in rest.values() for w in (v.values() if isinstance(v, dict) else [v])]
    return next((v.strip() for v in values if isinstance(v, str) and v.strip()), "")


class _BoxedElements(HTMLParser):
    """The elements of "qwenvl html" that carry a `data-bbox`, with their text (their descendants'
    included, pieces separated by a space so that a table's cells stay apart). The standard library's
    parser: lenient with unclosed tags, as a cut-off answer has."""

    VOID = {"br", "hr", "img", "input", "meta", "link", "area", "base", "col", "source", "wbr"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.found: list[tuple[str, dict, list[str]]] = []
        self.open: list[tuple[str, list[str] | None]] = []  # each open tag, and its text if it has a box

    def handle_starttag(self, tag, attrs):
        text = self._record(tag, attrs)
        if tag not in self.VOID:
            self.open.append((tag, text))

    def handle_startendtag(self, tag, attrs):
        self._record(tag, attrs)

    def _record(self, tag, attrs) -> list[str] | None:
        attributes = {name: value or "" for name, value in attrs}
        if "data-bbox" not in attributes:
            return None
        text: list[str] = []
        self.found.append((tag, attributes, text))
        return text

    def handle_endtag(self, tag):
        for i in range(len(self.open) - 1, -1, -1):
            if self.open[i][0] == tag:
                del self.open[i:]
                return

    def handle_data(self, data):
        for _, text in self.open:
            if text is not None:
                text.append(data)


def _html_elements(text: str) -> Iterator[tuple]:
    if "data-bbox" not in text:
        return
    elements = _BoxedElements()
    elements.feed(text)
    elements.close()
    for tag, attributes, parts in elements.found:
        box = _numbers(re.split(r"[\s,]+", attributes.pop("data-bbox").strip()), 4)
        if box:
            label = attributes.pop("class", "").strip() or tag
            yield label, box, None, {"tag": tag, "text": " ".join(" ".join(parts).split()), **attributes}


_NUMBER = r"\s*(-?\d+(?:\.\d+)?)\s*"
_MARKDOWN_COMMENT = re.compile(rf"<!--\s*([A-Za-z][\w ]*?)\s*\({','.join([_NUMBER] * 4)}\)\s*-->")


def _markdown_comments(text: str) -> Iterator[tuple]:
    for match in _MARKDOWN_COMMENT.finditer(text):
        yield match[1], tuple(float(v) for v in match.groups()[1:]), None, {}


_XML_POINTS = re.compile(r"<(points?)\b([^<>]*?)/?>(?:([^<]*)</\1\s*>)?", re.IGNORECASE)
_XML_ATTRIBUTE = re.compile(r"""([A-Za-z_][\w-]*)\s*=\s*(?:"([^"]*)"|'([^']*)')""")


def _xml_points(text: str) -> Iterator[tuple]:
    """Each coordinate pair of each `<points ...>` / `<point ...>` element, labelled by `alt`, else by the
    element's text. Read with regular expressions rather than an XML parser: the elements sit inside
    free text, often unclosed when the answer was cut off, which a strict parser refuses."""
    for match in _XML_POINTS.finditer(text):
        attributes = {
            m[1].lower(): m[2] if m[2] is not None else m[3] for m in _XML_ATTRIBUTE.finditer(match[2])
        }
        phrase = " ".join((match[3] or "").split())
        label = attributes.get("alt", "").strip() or phrase
        pairs = [("x", "y")] if "x" in attributes else []
        pairs += [(f"x{i}", f"y{i}") for i in range(1, len(attributes) + 1) if f"x{i}" in attributes]
        for x, y in pairs:
            point = _numbers([attributes[x], attributes.get(y)], 2)
            if point:
                yield label, None, point, {"text": phrase} if phrase and phrase != label else {}


def _in_pixels(label, box, point, attributes, width, height) -> Detection:
    """Relative coordinates to pixels. Values outside 0-1000 are clamped to the image's edges (the model
    now and then overshoots by a little), and reversed corners are put in order, as the cookbook does."""

    def x(v):
        return min(max(v * width / SCALE, 0.0), float(width))

    def y(v):
        return min(max(v * height / SCALE, 0.0), float(height))

    if box:
        x1, x2 = sorted((x(box[0]), x(box[2])))
        y1, y2 = sorted((y(box[1]), y(box[3])))
        box = (x1, y1, x2, y2)
    if point:
        point = (x(point[0]), y(point[1]))
    return Detection(label=label, box=box, point=point, attributes=attributes)


def describe(detections: list[Detection]) -> str:
    """'2 boxes and 1 point'."""
    boxes = sum(d.box is not None for d in detections)
    points = sum(d.point is not None for d in detections)
    counts = [(boxes, "box", "boxes"), (points, "point", "points")]
    return " and ".join(f"{n} {one if n == 1 else many}" for n, one, many in counts if n) or "nothing"


# ---- drawing ------------------------------------------------------------------------------------------

# Distinct colours (Trubetskoy's list), one per label in order of appearance.
PALETTE = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40),
)  # fmt: skip
# Fonts with CJK first (labels are often Chinese), then Latin ones; Linux's, then macOS's; else Pillow's.
FONTS = ("NotoSansCJK-Regular.ttc", "DejaVuSans.ttf", "Arial Unicode.ttf", "Arial.ttf")


def draw(image, detections: list[Detection]) -> Image.Image:
    """A new RGB picture of `image` (anything `image.load_image` takes; left untouched) with each box and
    point in its label's colour, and the labels. Every mark has a light and a dark part (a colour and its
    contrasting halo, a label's colour behind text in black or white), so it shows on any background."""
    original = image
    canvas = load_image(image)
    if canvas is original:
        canvas = canvas.copy()
    pen = ImageDraw.Draw(canvas)
    width = max(2, round(min(canvas.size) / 250))  # line width grows with the image
    font = _font(max(12, round(min(canvas.size) / 40)))
    colours = _colours(detections)
    for d in detections:
        colour = colours[d.label]
        if d.box:
            _box(pen, d.box, colour, width)
        if d.point:
            _dot(pen, d.point, colour, width)
    for d in detections:  # after every shape, so no box crosses a label
        if d.label:
            x, y = (d.box[0], d.box[1]) if d.box else (d.point[0] + 2 * width, d.point[1] - 2 * width)
            _label(pen, d.label, (x, y), colours[d.label], font, canvas.size)
    return canvas


def _colours(detections: list[Detection]) -> dict[str, tuple[int, int, int]]:
    labels = dict.fromkeys(d.label for d in detections)
    return {label: PALETTE[i % len(PALETTE)] for i, label in enumerate(labels)}


def _contrast(colour) -> tuple[int, int, int]:
    """Black on light colours, white on dark ones (ITU-R BT.601 luma)."""
    r, g, b = colour
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 150 else (255, 255, 255)


def _box(pen: ImageDraw.ImageDraw, box, colour, width: int) -> None:
    """The line runs just inside the box's edges, with a halo of the contrasting colour on both sides."""
    x1, y1 = round(box[0]), round(box[1])
    x2, y2 = max(round(box[2]) - 1, x1), max(round(box[3]) - 1, y1)  # the last pixels inside the box
    halo = max(1, width // 2)
    outer = (x1 - halo, y1 - halo, x2 + halo, y2 + halo)
    pen.rectangle(outer, outline=_contrast(colour), width=width + 2 * halo)
    pen.rectangle((x1, y1, x2, y2), outline=colour, width=width)


def _dot(pen: ImageDraw.ImageDraw, point, colour, width: int) -> None:
    x, y = point
    radius = 2 * width
    halo = radius + max(1, width // 2)
    pen.ellipse((x - halo, y - halo, x + halo, y + halo), fill=_contrast(colour))
    pen.ellipse((x - radius, y - radius, x + radius, y + radius), fill=colour)


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    for name in FONTS:
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one small bitmap font
        return ImageFont.load_default()


def _label(pen: ImageDraw.ImageDraw, text: str, corner, colour, font, image_size) -> None:
    """Text on a block of the label's colour, above the corner when it fits, else just inside."""
    left, top, right, bottom = pen.textbbox((0, 0), text, font=font)
    pad = max(2, (bottom - top) // 5)
    w, h = right - left + 2 * pad, bottom - top + 2 * pad
    x = min(max(round(corner[0]), 0), max(image_size[0] - w, 0))
    y = round(corner[1]) - h if corner[1] >= h else max(round(corner[1]), 0)
    pen.rectangle((x, y, x + w - 1, y + h - 1), fill=colour)
    pen.text((x + pad - left, y + pad - top), text, fill=_contrast(colour), font=font)


# ---- chat.py: which image an answer is about, and saving the picture --------------------------------


class Drawings:
    """The pictures of a conversation: an answer is about its conversation's latest image (a question with
    only videos ends that), and each answer that locates something there is saved in `folder` (None: only
    on request, with `save`). The last one can be saved again."""

    def __init__(self, folder: str | Path | None = None):
        self.folder = folder
        self.clear()

    def clear(self) -> None:
        """A new conversation: no image, nothing to draw."""
        self.image = None
        self.last: tuple[object, str] | None = None  # (image source, answer) of the last answer drawn

    def asked(self, images: list, videos: list = ()) -> None:
        """Record a question's media (once it is part of the conversation)."""
        if images:
            self.image = images[-1]
        elif videos:
            self.image = None

    def answered(self, text: str) -> tuple[Path, str] | None:
        """Remember an answer that locates something on the latest image; saved when there is a folder.
        Returns (path, what was drawn) when saved."""
        if self.image is None or not parse(text, (SCALE, SCALE)):
            return None
        self.last = (self.image, text)
        return self.save() if self.folder is not None else None

    def save(self, folder: str | Path | None = None) -> tuple[Path, str]:
        """Draw the last answer that located something on its image into `folder` (else the one given at
        creation, else the current directory) under a new name; returns (path, what was drawn)."""
        if self.last is None:
            raise Qwen3VLError("nothing to draw: no answer so far has boxes or points on an image")
        source, text = self.last
        picture = load_image(source)
        found = parse(text, picture.size)
        path = _new_path(Path(folder or self.folder or "."), _stem(source))
        draw(picture, found).save(path)
        return path, f"{describe(found)} on {_name(source)}"


def _where(source) -> str | None:
    """The image's path or URL, if it has one."""
    if isinstance(source, (str, Path)) and not str(source).startswith("data:"):
        return str(source)
    return None


def _name(source) -> str:
    return _where(source) or "the image"


def _stem(source) -> str:
    """A file-name stem from the image's path or URL ('photo' for photo.jpg), else 'image'."""
    where = _where(source)
    stem = Path(where.split("?")[0].rstrip("/")).stem if where else ""
    return re.sub(r"[^\w.-]+", "_", stem).strip("._") or "image"


def check_drawing_folder(folder: str | Path) -> Path:
    """`folder` as a place drawings can be saved in, created when the first one is (a run that draws
    nothing leaves no folder behind); or a Qwen3VLError saying what it should be and what is wrong with
    it, where the system's own message would only say "File exists"."""
    path = Path(folder).expanduser()
    if path.exists() and not path.is_dir():
        raise Qwen3VLError(f"{folder}: is a file; drawings are saved in a folder (give a folder's path)")
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise Qwen3VLError(f"{folder}: cannot create this folder for the drawings ({existing} is a file)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise Qwen3VLError(f"{folder}: cannot save drawings there ({existing} is not writable)")
    return path


def _new_path(folder: Path, stem: str) -> Path:
    """`folder/stem-grounding.png`, or -2, -3, ... when taken: saving again never overwrites."""
    check_drawing_folder(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise Qwen3VLError(f"{folder}: cannot create this folder for the drawings ({e.strerror})") from None
    path, n = folder / f"{stem}-grounding.png", 1
    while path.exists():
        n += 1
        path = folder / f"{stem}-grounding-{n}.png"
    return path
