"""Video input: which frames to keep, at what size, and when each was shown (docs/reference.md §5.3, §7).

Sampling and sizing follow qwen-vl-utils (the Qwen3-VL cookbook path): about 2 frames per second, an even
count between 4 and 768, a per-frame pixel cap from a total pixel budget. `plan_frames` is that arithmetic
alone, so it can be checked against qwen-vl-utils for any metadata; `load_video` decodes a file with
OpenCV (or takes a list of frames) and keeps only the planned frames, already resized.

    video = load_video("clip.mp4", VideoOptions(fps=1.0))
    video.frames            # [T, H, W, 3] uint8, T even
    video.group_timestamps()  # seconds, one per temporal patch of 2 frames
"""

from __future__ import annotations

import bisect
import math
import numbers
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from .errors import Qwen3VLError
from .image import resize_rgb, smart_resize, to_rgb

# qwen-vl-utils constants, with image_factor = patch_size 16 * merge_size 2.
FACTOR = 32
FRAME_FACTOR = 2  # frames per temporal patch: counts are kept even
DEFAULT_FPS = 2.0
LIST_FPS = 2.0  # the frame rate of a list of frames when none is given (qwen-vl-utils' sample_fps)
FRAME_MIN_PIXELS = 128 * FACTOR * FACTOR
FRAME_MAX_PIXELS = 768 * FACTOR * FACTOR
TOTAL_PIXELS = 128000 * FACTOR * FACTOR * 0.9  # its MODEL_SEQ_LEN default, 90% of it for the video

# Skipping frames: grab() decodes each one; OpenCV's seek decodes forward from the last keyframe at or
# before its target minus SEEK_LEAD frames (cap_ffmpeg_impl.hpp, `seek`), after flushing the decoder and
# finding the keyframe, which cost about as much as decoding a few frames (SEEK_COST_FRAMES). Where the
# keyframes are unknown, SEEK_GAP is the longest common keyframe interval (x264's default).
SEEK_LEAD = 16
SEEK_COST_FRAMES = 8
SEEK_GAP = 250
# A long file is read by several captures at once, each decoding a contiguous part of the planned frames
# into its own rows of the output: OpenCV decodes one capture on about one core, and releases the GIL
# while it does. At most READERS of them, each spanning at least READER_MIN_FRAMES frames of the file, so
# that a short clip does not pay for opening captures and seeking to decode a few frames more at once.
READERS = min(4, os.cpu_count() or 1)
READER_MIN_FRAMES = 1500


@dataclass
class VideoOptions:
    """The user's sampling and sizing options; None means qwen-vl-utils' default."""

    fps: float | None = None  # frames sampled per second; 2.0 unless nframes is given
    nframes: int | None = None  # a fixed frame count instead (rounded to an even number)
    min_frames: int = 4
    max_frames: int = 768
    min_pixels: int | None = None  # per frame; default 128 * 32 * 32
    max_pixels: int | None = None  # per frame; can only lower the cap that total_pixels gives
    total_pixels: int | None = None  # budget over all frames; default 128000 * 32 * 32 * 0.9
    video_start: float | None = None  # seconds
    video_end: float | None = None

    def __post_init__(self):
        self._check_types()
        if self.fps is not None and self.nframes is not None:
            raise Qwen3VLError("video options fps and nframes: give one of them, not both")
        if self.fps is not None and not self.fps > 0:
            _bad_option("fps", self.fps, "must be > 0")
        if self.nframes is not None and self.nframes < 2:
            _bad_option("nframes", self.nframes, "must be >= 2")
        if self.min_frames < 1:
            _bad_option("min_frames", self.min_frames, "must be >= 1")
        if self.max_frames < max(2, self.min_frames):
            _bad_option("max_frames", self.max_frames, f"must be >= 2 and >= min_frames ({self.min_frames})")
        self._check_pixels()
        if self.video_start is not None and not self.video_start >= 0:
            _bad_option("video_start", self.video_start, "must be >= 0 seconds")
        if self.video_end is not None and not self.video_end > (self.video_start or 0):
            _bad_option("video_end", self.video_end, f"must be > video_start ({self.video_start or 0} s)")

    def _check_types(self):
        # Options often come from JSON or a chat message: a string "2" must fail here, not deep inside.
        integers = ("nframes", "min_frames", "max_frames", "min_pixels", "max_pixels", "total_pixels")
        for name in ("fps", "video_start", "video_end", *integers):
            value = getattr(self, name)
            if value is None and name not in ("min_frames", "max_frames"):
                continue
            kind, rule = (numbers.Integral, "an integer") if name in integers else (numbers.Real, "a number")
            if not isinstance(value, kind) or isinstance(value, bool):
                _bad_option(name, value, f"must be {rule}")

    def _check_pixels(self):
        for name in ("min_pixels", "max_pixels", "total_pixels"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                _bad_option(name, getattr(self, name), "must be > 0")
        # A max_pixels below min_pixels is not refused (qwen-vl-utils asserts, transformers does not): the
        # frames are scaled to fit max_pixels, as transformers does.

    @property
    def frame_min_pixels(self) -> int:
        return FRAME_MIN_PIXELS if self.min_pixels is None else self.min_pixels


def _bad_option(name: str, value, rule: str):
    raise Qwen3VLError(f"video option {name}={value!r}: {rule}")


@dataclass
class FramePlan:
    """Which source frames to keep and the size to resize them to; arithmetic only, no decoding."""

    indices: list[int]  # source frame indices, ascending
    height: int  # multiples of 32
    width: int


def plan_frames(
    total_frames: int, source_fps: float, height: int, width: int, options: VideoOptions
) -> FramePlan:
    """qwen-vl-utils' `calculate_video_frame_range`, `smart_nframes`, its readers' frame indices and
    `fetch_video`'s sizing, for a video of `total_frames` frames of `width` x `height` at `source_fps`."""
    if total_frames < 2:
        raise Qwen3VLError(f"the video has {total_frames} frame(s); at least 2 are needed")
    if not source_fps > 0:
        raise Qwen3VLError(f"frame rate {source_fps} is not a positive number")
    first, last = _frame_range(total_frames, source_fps, options)
    nframes = _frame_count(last - first + 1, source_fps, options)
    frame_height, frame_width = _frame_size(height, width, nframes, options)
    return FramePlan(_sample_indices(first, last, nframes), frame_height, frame_width)


def _frame_range(total_frames: int, source_fps: float, options: VideoOptions) -> tuple[int, int]:
    """First and last source frame inside [video_start, video_end] (`calculate_video_frame_range`): start
    rounds up, end rounds down, both clamped to the video."""
    start, end = options.video_start, options.video_end
    duration = total_frames / source_fps
    first = 0 if start is None else math.ceil(max(0.0, min(start, duration)) * source_fps)
    last = total_frames - 1
    if end is not None:
        last = min(math.floor(max(0.0, min(end, duration)) * source_fps), total_frames - 1)
    if first >= last:
        raise Qwen3VLError(
            f"time range video_start={start} .. video_end={end} s selects fewer than 2 frames of a "
            f"{duration:.2f} s video ({total_frames} frames at {source_fps:g} fps)"
        )
    return first, last


def _frame_count(available: int, source_fps: float, options: VideoOptions) -> int:
    """`smart_nframes`: a fixed nframes rounded to even (Python round, half to even), or source duration
    times fps, clamped to [min_frames, max_frames] and to the frames available, floored to even."""
    if options.nframes is not None:
        nframes = round(options.nframes / FRAME_FACTOR) * FRAME_FACTOR
        if nframes > available:
            raise Qwen3VLError(
                f"video option nframes={options.nframes}: more than the {available} frames in the video "
                "(or in video_start .. video_end)"
            )
        return nframes
    fps = DEFAULT_FPS if options.fps is None else options.fps
    min_frames = math.ceil(options.min_frames / FRAME_FACTOR) * FRAME_FACTOR
    max_frames = math.floor(options.max_frames / FRAME_FACTOR) * FRAME_FACTOR
    nframes = min(max(available / source_fps * fps, min_frames), max_frames, available)
    return math.floor(nframes / FRAME_FACTOR) * FRAME_FACTOR


def _sample_indices(first: int, last: int, nframes: int) -> list[int]:
    """`torch.linspace(first, last, nframes).round().long()`, bit for bit, in numpy.

    torch works in float32: step = (last - first) / (nframes - 1); the first half of the points is
    first + step * i, the second half last - step * (nframes - 1 - i), each one fused multiply-add
    (one rounding). At 300k frames float32 steps are 1/32, so points land exactly on .5 and a second
    rounding would move some indices. step * i + first is exact in float64 (well under 53 bits), so one
    cast to float32 is the fused operation's rounding. torch.round, like np.rint, rounds half to even."""
    start, end = np.float32(first), np.float32(last)
    step = np.float32((end - start) / np.float32(nframes - 1))
    i = np.arange(nframes)
    from_start = np.float64(start) + np.float64(step) * i
    from_end = np.float64(end) - np.float64(step) * (nframes - 1 - i)
    points = np.where(i < nframes // 2, from_start, from_end).astype(np.float32)
    return np.rint(points).astype(np.int64).tolist()


def _frame_size(height: int, width: int, nframes: int, options: VideoOptions) -> tuple[int, int]:
    """`fetch_video`'s per-frame limits: the cap is the total budget shared by the frames (each pair is one
    temporal patch), at most 768 tokens and at least 5% above min_pixels; a user max_pixels only lowers it."""
    min_pixels = options.frame_min_pixels
    total_pixels = TOTAL_PIXELS if options.total_pixels is None else options.total_pixels
    max_pixels = max(min(FRAME_MAX_PIXELS, total_pixels / nframes * FRAME_FACTOR), int(min_pixels * 1.05))
    if options.max_pixels is not None:
        max_pixels = min(options.max_pixels, max_pixels)
    return smart_resize(height, width, FACTOR, min_pixels, max_pixels, at_least_one_block=True, what="frame")


@dataclass
class Video:
    """The kept frames, resized, and the time each was shown in the source."""

    frames: np.ndarray  # [T, H, W, 3] uint8 RGB, T even
    timestamps: list[float]  # seconds: source frame index / source fps
    source_fps: float
    source_size: tuple[int, int] = (0, 0)  # width, height of the source frames

    def group_timestamps(self, temporal_patch_size: int = 2) -> list[float]:
        """One time per temporal patch, the mean of its first and last frame's time, as transformers'
        `_calculate_timestamps` (an incomplete last group repeats the last frame's time)."""
        times = list(self.timestamps)
        times += times[-1:] * (-len(times) % temporal_patch_size)
        return [
            (times[i] + times[i + temporal_patch_size - 1]) / 2
            for i in range(0, len(times), temporal_patch_size)
        ]


def load_video(
    source, options: VideoOptions | None = None, *, fps: float | None = None, progress=None
) -> Video:
    """A video file (path; decoded with OpenCV), sampled and resized per `options`, or a list of frames (PIL
    images or HxWx3 uint8 arrays). `fps` is the source frame rate: for a file it overrides the
    container's; a frame list is shown at that rate (default LIST_FPS). A list is taken as already
    sampled, as qwen-vl-utils takes it: every frame kept, an odd count padded with the last frame, unless
    `options` ask for sampling (fps, nframes, video_start, video_end). `progress(done, total)` sees each
    kept frame of a file as it is read (an hour-long file takes a while; such a file is read by several
    threads at once, which call it one at a time)."""
    options = options or VideoOptions()
    if fps is not None and (isinstance(fps, bool) or not isinstance(fps, numbers.Real) or not fps > 0):
        raise Qwen3VLError(f"source fps={fps!r}: must be a number > 0")
    if isinstance(source, (list, tuple)):
        return _load_frame_list(source, options, fps)
    if isinstance(source, (str, Path)):
        return _load_file(source, options, fps, progress)
    raise Qwen3VLError(
        f"unsupported video input of type {type(source).__name__}: give a file path or a list of frames"
    )


def _load_file(source: str | Path, options: VideoOptions, fps: float | None, progress=None) -> Video:
    text = str(source)
    if text.startswith(("http://", "https://")):
        raise Qwen3VLError(f"{text}: video URLs are not supported; download the file and pass its path")
    path = Path(text.removeprefix("file://")).expanduser()
    if not path.is_file():
        raise Qwen3VLError(f"{path}: no such video file")
    if path.stat().st_size == 0:
        raise Qwen3VLError(f"{path}: empty file (0 bytes)")
    capture = _open(path)
    try:
        total_frames = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        if total_frames <= 0:
            # Some containers (raw streams, some webm) carry no frame count: count by decoding once
            # (grab only, nothing kept), then start again from the top.
            capture.release()
            total_frames = _count_frames(path)
            capture = _open(path)
        if total_frames == 0:
            raise Qwen3VLError(f"{path}: no readable video frames")
        source_fps = fps or capture.get(cv2.CAP_PROP_FPS)
        if not source_fps > 0:
            raise Qwen3VLError(f"{path}: the container has no frame rate; pass fps=<source frame rate>")
        # OpenCV reports the displayed size (rotation flags applied), as it decodes.
        height = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
        width = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH))
        plan = _plan(str(path), total_frames, source_fps, height, width, options)
        parts = _reading_parts(plan.indices)
        keyframes = _keyframes(path) if parts > 1 or _may_seek(plan.indices) else None
        if parts > 1 and keyframes is not None:  # each part starts with a seek: keyframes needed
            capture.release()
            video = _collect_in_parts(path, plan, keyframes, parts, source_fps, progress)
        else:
            decoded = _decode(capture, plan.indices, keyframes)
            video = _collect(str(path), decoded, plan, source_fps, progress=progress)
        video.source_size = (width, height)
        return video
    finally:
        capture.release()


def _open(path: Path) -> cv2.VideoCapture:
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        capture.release()
        raise Qwen3VLError(f"{path}: OpenCV cannot open it as a video (unsupported format or corrupt file)")
    return capture


def _count_frames(path: Path) -> int:
    capture = _open(path)
    try:
        count = 0
        while capture.grab():
            count += 1
        return count
    finally:
        capture.release()


def _may_seek(indices: Sequence[int]) -> bool:
    """Whether a gap between planned frames is long enough for a seek to pay (then the keyframes are worth
    knowing)."""
    return bool(np.diff([0, *indices]).max() > SEEK_LEAD + SEEK_COST_FRAMES)


def _reading_parts(indices: Sequence[int]) -> int:
    """How many captures read these planned frames at once (READERS)."""
    return max(1, min(READERS, len(indices) // 2, (indices[-1] - indices[0]) // READER_MIN_FRAMES))


def _keyframes(path: Path) -> list[int] | None:
    """Indices of the video's keyframes, from its packets alone (OpenCV's raw mode: read, never decoded,
    a small part of the time decoding takes). None where the backend cannot tell (raw mode is FFmpeg's)."""
    capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG, [cv2.CAP_PROP_FORMAT, -1])
    try:
        keyframes, index = [], 0
        while capture.isOpened() and capture.grab():
            if capture.get(cv2.CAP_PROP_LRF_HAS_KEY_FRAME) > 0:
                keyframes.append(index)
            index += 1
        return keyframes or None
    finally:
        capture.release()


def _seek_pays(keyframes: list[int] | None, position: int, index: int) -> bool:
    """Whether seeking to frame `index` decodes fewer frames than grabbing forward from `position`.
    OpenCV's seek decodes forward from the last keyframe at or before index - SEEK_LEAD; it pays when that
    keyframe lies beyond `position` by more than a seek's own cost. Without the keyframes, only a gap
    longer than the longest common keyframe interval is sure to hold one."""
    if keyframes is None:
        return index - position > SEEK_GAP
    landing = bisect.bisect_right(keyframes, index - SEEK_LEAD) - 1
    return landing >= 0 and keyframes[landing] - position > SEEK_COST_FRAMES


def _decode(
    capture: cv2.VideoCapture, indices: Sequence[int], keyframes: list[int] | None = None
) -> Iterator[tuple[int, np.ndarray]]:
    """(index, RGB frame) for each planned index, reading forward: skipped frames are grabbed (decoded,
    never converted or copied out) or, where a keyframe lets a seek decode fewer of them (`_seek_pays`),
    seeked over. Stops quietly where the stream ends."""
    position, rgb = 0, None  # index of the frame the next grab() returns; the last frame kept
    for index in indices:
        if index < position:  # a repeated index: only past 2**22 frames, where float32 points are coarse
            yield index, rgb
            continue
        if _seek_pays(keyframes, position, index) and capture.set(cv2.CAP_PROP_POS_FRAMES, index):
            # OpenCV's own count of where it is now is the truth from here on (short of the target: grab
            # forward). It numbers frames by their timestamps: at a constant frame rate, the numbers of a
            # sequential decode (tests/test_video.py compares the two).
            position = int(capture.get(cv2.CAP_PROP_POS_FRAMES))
            if position > index:
                return  # overshot: a broken index or a stream shorter than its metadata
        while position < index:
            if not capture.grab():
                return
            position += 1
        if not capture.grab():
            return
        ok, bgr = capture.retrieve()
        if not ok:
            return
        position += 1
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        yield index, rgb


def _load_frame_list(frames: Sequence, options: VideoOptions, fps: float | None) -> Video:
    name = f"list of {len(frames)} frames"
    fps = LIST_FPS if fps is None else fps
    if not frames:
        raise Qwen3VLError("an empty list of frames is not a video")
    sizes = {_list_frame_size(name, k, frame) for k, frame in enumerate(frames)}
    if len(sizes) > 1:
        raise Qwen3VLError(f"{name}: frames of different sizes {sorted(sizes)} (height, width)")
    height, width = sizes.pop()
    sampling = (options.fps, options.nframes, options.video_start, options.video_end)
    if any(option is not None for option in sampling):
        plan = _plan(name, len(frames), fps, height, width, options)
        video = _collect(name, ((i, _rgb_array(frames[i])) for i in plan.indices), plan, fps)
    else:
        # Already sampled: every frame, sized for the padded (even) count; the padding frame is shown
        # next, one frame period later (qwen-vl-utils numbers the padded list 0..n).
        count = len(frames) + len(frames) % FRAME_FACTOR
        try:
            size = _frame_size(height, width, count, options)
        except Qwen3VLError as e:
            raise Qwen3VLError(f"{name}: {e}") from None
        plan = FramePlan(list(range(len(frames))), *size)
        decoded = ((i, _rgb_array(frame)) for i, frame in enumerate(frames))
        video = _collect(name, decoded, plan, fps, pad_next=True)
    video.source_size = (width, height)
    return video


def _list_frame_size(name: str, k: int, frame) -> tuple[int, int]:
    if isinstance(frame, Image.Image):
        return frame.height, frame.width
    if isinstance(frame, np.ndarray) and frame.ndim == 3 and frame.shape[2] == 3 and frame.dtype == np.uint8:
        return frame.shape[:2]
    shape = getattr(frame, "shape", None)
    raise Qwen3VLError(
        f"{name}: frame {k} must be a PIL image or an HxWx3 uint8 array, got {type(frame).__name__} "
        f"{shape if shape is not None else ''}".rstrip()
    )


def _rgb_array(frame) -> np.ndarray:
    # PIL frames get the image path's conversion: transparency composited on white (docs/reference.md §7).
    return np.asarray(to_rgb(frame)) if isinstance(frame, Image.Image) else frame


def _plan(
    name: str, total_frames: int, source_fps: float, height: int, width: int, options: VideoOptions
) -> FramePlan:
    try:
        return plan_frames(total_frames, source_fps, height, width, options)
    except Qwen3VLError as e:
        raise Qwen3VLError(f"{name}: {e}") from None


def _collect(
    name: str,
    decoded: Iterable[tuple[int, np.ndarray]],
    plan: FramePlan,
    source_fps: float,
    pad_next: bool = False,
    progress=None,
) -> Video:
    """Resize each kept frame into the output as it arrives: only kept frames are ever held, once. A stream
    that ends early keeps what it gave (at least 2 frames of a file); an odd count repeats the last
    frame, as the processor would, at the last frame's time (transformers' timestamps) or, `pad_next`,
    one frame later (a list of frames numbered 0..n, as qwen-vl-utils pads it)."""
    frames = _frame_rows(plan)
    indices = []
    for index, rgb in decoded:
        frames[len(indices)] = resize_rgb(rgb, plan.height, plan.width)
        indices.append(index)
        if progress:
            progress(len(indices), len(plan.indices))
    return _finished(name, frames, indices, plan, source_fps, pad_next)


def _frame_rows(plan: FramePlan) -> np.ndarray:
    """The output's frames, one row more than planned for the padding of an odd count."""
    return np.empty((len(plan.indices) + 1, plan.height, plan.width, 3), np.uint8)


def _collect_in_parts(
    path: Path, plan: FramePlan, keyframes: list[int], parts: int, source_fps: float, progress=None
) -> Video:
    """`_collect` of a file read by `parts` captures at once (READERS), each decoding a contiguous part of
    the plan (its first frame reached by a seek) into its own rows of the output. The frames kept are
    those one capture would keep: the parts in order, up to the first that ends early (a stream shorter
    than its metadata, or broken there). An error in one part, or Ctrl-C, stops the others at their
    next frame."""
    frames = _frame_rows(plan)
    bounds = [(int(part[0]), int(part[-1]) + 1) for part in np.array_split(range(len(plan.indices)), parts)]
    read = [0] * parts
    stop, lock = threading.Event(), threading.Lock()

    def read_part(k: int) -> None:
        start, end = bounds[k]
        capture = _open(path)
        try:
            for row, (_, rgb) in enumerate(_decode(capture, plan.indices[start:end], keyframes), start):
                if stop.is_set():
                    return
                frames[row] = resize_rgb(rgb, plan.height, plan.width)
                with lock:
                    read[k] += 1
                    if progress:
                        progress(sum(read), len(plan.indices))
        except BaseException:
            stop.set()
            raise
        finally:
            capture.release()

    with ThreadPoolExecutor(parts, thread_name_prefix="mlx-qwen3vl-video") as pool:
        futures = [pool.submit(read_part, k) for k in range(parts)]
        try:
            for future in futures:
                future.result()
        finally:  # Ctrl-C reaches this thread
            stop.set()
    count = 0
    for (start, end), done in zip(bounds, read, strict=True):
        count = start + done
        if done < end - start:
            break
    return _finished(str(path), frames, plan.indices[:count], plan, source_fps)


def _finished(
    name: str, frames: np.ndarray, indices: list[int], plan: FramePlan, source_fps: float, pad_next=False
) -> Video:
    """The video of the frames read into the first len(indices) rows of `frames` (`_collect`)."""
    indices = list(indices)
    if len(indices) < (1 if pad_next else 2):
        what = "no readable video frames" if not indices else "only 1 readable frame"
        raise Qwen3VLError(
            f"{name}: {what} (needed frame {plan.indices[len(indices)]}); at least 2 are needed"
        )
    if len(indices) % FRAME_FACTOR:
        frames[len(indices)] = frames[len(indices) - 1]
        indices.append(indices[-1] + 1 if pad_next else indices[-1])
    return Video(frames[: len(indices)], [i / source_fps for i in indices], source_fps)
