"""Video input against qwen-vl-utils (docs/reference.md §5.3, §7): frame count, frame indices, frame size and
timestamps, decoding that keeps only the planned frames, and the errors a user can meet."""

from __future__ import annotations

import random
from dataclasses import asdict

import cv2
import numpy as np
import pytest
import torch
from media import qwen_vl_utils, write_video
from PIL import Image
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

from mlx_qwen3vl import video as video_module
from mlx_qwen3vl.errors import Qwen3VLError
from mlx_qwen3vl.video import FramePlan, VideoOptions, load_video, plan_frames

vp = qwen_vl_utils()


# ---- the reference plan: qwen-vl-utils' own functions ---------------------------------------------------


def _qwen_element(options: VideoOptions) -> dict:
    """The options as a qwen-vl-utils video element: only the keys a user would set (min/max_frames only
    when not the defaults, so its own defaults are exercised)."""
    element = {k: v for k, v in asdict(options).items() if v is not None}
    for key, default in (("min_frames", 4), ("max_frames", 768)):
        if element[key] == default:
            del element[key]
    return element


class _Resized:
    """What the stubbed torchvision resize returns: only the shape, no pixels (4K x 768 frames)."""

    def __init__(self, shape):
        self.shape = shape

    def float(self):
        return self


def _reference_size(monkeypatch, element: dict, nframes: int, height: int, width: int) -> tuple[int, int]:
    """fetch_video's sizing, run by fetch_video itself on a reader that returns `nframes` pixel-less
    frames of the given size."""

    def reader(_element):
        frames = torch.zeros((1, 1, 1, 1), dtype=torch.uint8).expand(nframes, 3, height, width)
        return frames, {}, 2.0

    monkeypatch.setattr(vp, "get_video_reader_backend", lambda: "metadata")
    monkeypatch.setitem(vp.VIDEO_READER_BACKENDS, "metadata", reader)
    monkeypatch.setattr(
        vp.transforms.functional, "resize", lambda video, size, **_: _Resized((*video.shape[:2], *size))
    )
    resized = vp.fetch_video({"video": "metadata-only", **element}, image_patch_size=16)
    return tuple(resized.shape[2:])


def _reference_plan(monkeypatch, total_frames, source_fps, height, width, options) -> FramePlan:
    """The steps of qwen-vl-utils' decord/torchcodec readers, then fetch_video's sizing."""
    element = _qwen_element(options)
    first, last, available = vp.calculate_video_frame_range(element, total_frames, source_fps)
    nframes = vp.smart_nframes(element, total_frames=available, video_fps=source_fps)
    indices = torch.linspace(first, last, nframes).round().long().tolist()
    return FramePlan(indices, *_reference_size(monkeypatch, element, nframes, height, width))


# (name, width, height, total frames, source fps)
VIDEOS = [
    ("1280x720 10s@30", 1280, 720, 300, 30.0),
    ("640x480 1.5s@30", 640, 480, 45, 30.0),
    ("320x240 7 frames", 320, 240, 7, 30.0),
    ("640x360 40s@25", 640, 360, 1000, 25.0),
    ("720x1280 vertical 12s@30", 720, 1280, 360, 30.0),
    ("40x30 tiny 5s@30", 40, 30, 150, 30.0),
    ("3840x2160 60s@60", 3840, 2160, 3600, 60.0),
    ("1920x1080 3h@29.97", 1920, 1080, 323676, 29.97),
    ("1920x1080 1h@23.976", 1920, 1080, 86314, 23.976),
    ("1001x333 3 frames", 1001, 333, 3, 30.0),
    ("64x64 2 frames", 64, 64, 2, 1.0),
    ("500x500 20s@15.5", 500, 500, 310, 15.5),
    ("1000x10 strip 2s@30", 1000, 10, 60, 30.0),
]
OPTIONS = [
    {},
    {"fps": 1.0},
    {"fps": 0.5, "min_frames": 9, "max_frames": 31},
    {"nframes": 10},
    {"nframes": 7},  # rounds to 8
    {"nframes": 5},  # rounds to 4: Python round is half to even
    {"max_pixels": 200_000},
    {"max_pixels": 1_000_000},  # above the 768-token cap: cannot raise it
    {"total_pixels": 4_000_000},
    {"total_pixels": 200_000},  # the per-frame floor, 5% above min_pixels, binds
    {"min_pixels": 1024},  # the 1000x10 strip keeps its 32-pixel side (qwen-vl-utils' smart_resize)
    {"min_pixels": 256 * 32 * 32},
    {"video_start": 1.0, "video_end": 4.3},
    {"video_start": 2.5},
    {"video_end": 0.9},
    {"video_start": 0.1},  # 0.1 * 30 = 3.0000000000000004: the first frame is 4
]


@pytest.mark.parametrize("name, width, height, total_frames, source_fps", VIDEOS, ids=[v[0] for v in VIDEOS])
def test_plan_equals_qwen_vl_utils(monkeypatch, name, width, height, total_frames, source_fps):
    """Frame count, indices and size equal qwen-vl-utils for every option set; where it refuses (a range
    or nframes the video cannot give), we raise our error instead."""
    refused = 0
    for kwargs in OPTIONS:
        options = VideoOptions(**kwargs)
        try:
            expected = _reference_plan(monkeypatch, total_frames, source_fps, height, width, options)
        except ValueError:
            refused += 1
            with pytest.raises(Qwen3VLError):
                plan_frames(total_frames, source_fps, height, width, options)
            continue
        plan = plan_frames(total_frames, source_fps, height, width, options)
        assert plan == expected, kwargs
        assert len(plan.indices) % 2 == 0 and plan.height % 32 == 0 and plan.width % 32 == 0
    assert refused < len(OPTIONS)


def test_spec_worked_example():
    """docs/reference.md §5.3: 10 s of 1280x720 at 30 fps -> 20 frames at these indices; with the per-frame
    cap the grid is (10, 40, 72), i.e. 640x1152 frames."""
    plan = plan_frames(300, 30.0, 720, 1280, VideoOptions())
    assert plan.indices == [
        0,
        16,
        31,
        47,
        63,
        79,
        94,
        110,
        126,
        142,
        157,
        173,
        189,
        205,
        220,
        236,
        252,
        268,
        283,
        299,
    ]
    assert (plan.height, plan.width) == (640, 1152)


def test_no_side_floored_to_zero(monkeypatch):
    """Where qwen-vl-utils' smart_resize floors a side to 0 (and its resize then fails), we keep one block."""
    options = VideoOptions(min_pixels=1024, max_pixels=4096)
    assert _reference_plan(monkeypatch, 60, 30.0, 10, 1000, options).height == 0
    plan = plan_frames(60, 30.0, 10, 1000, options)
    assert (plan.height, plan.width) == (32, 640)


def test_random_metadata_equals_qwen_vl_utils(monkeypatch):
    rng = random.Random(0)
    for _ in range(300):
        total = rng.choice([rng.randint(2, 600), rng.randint(600, 50_000), rng.randint(50_000, 2_000_000)])
        fps = rng.choice([23.976, 24.0, 25.0, 29.97, 30.0, 50.0, 59.94, 60.0, rng.uniform(1, 120)])
        width, height = rng.randint(32, 4096), rng.randint(32, 4096)
        expected = _reference_plan(monkeypatch, total, fps, height, width, VideoOptions())
        assert plan_frames(total, fps, height, width, VideoOptions()) == expected, (total, fps, width, height)


def test_frame_indices_equal_torch_linspace_bit_for_bit():
    """torch.linspace is float32 with fused multiply-adds; at hour-long lengths its points fall on .5 and a
    plain float32 (or float64) computation rounds some of them the other way."""
    rng = random.Random(1)
    for _ in range(3000):
        total = rng.choice(
            [rng.randint(2, 1000), rng.randint(1000, 100_000), rng.randint(100_000, 5_000_000)]
        )
        nframes = rng.randint(2, min(768, total))
        first = rng.randint(0, total // 3) if rng.random() < 0.3 else 0
        expected = torch.linspace(first, total - 1, nframes).round().long().tolist()
        assert video_module._sample_indices(first, total - 1, nframes) == expected, (first, total, nframes)


# ---- real files -------------------------------------------------------------------------------------------

# Each test frame is 64x48: 12 blocks of 16x16 pixels, block b red when bit b of the frame number is set.
BLOCK, ROWS, COLS = 16, 3, 4


def _coded_frame(number: int) -> np.ndarray:
    """RGB frame whose red blocks spell `number` in binary."""
    frame = np.zeros((ROWS * BLOCK, COLS * BLOCK, 3), np.uint8)
    for bit in range(ROWS * COLS):
        if number >> bit & 1:
            row, col = divmod(bit, COLS)
            frame[row * BLOCK : (row + 1) * BLOCK, col * BLOCK : (col + 1) * BLOCK] = (255, 0, 0)
    return frame


def _read_number(frame: np.ndarray) -> int:
    """The number a (resized) coded RGB frame spells; checks that set blocks are red, not blue."""
    height, width = frame.shape[:2]
    number = 0
    for bit in range(ROWS * COLS):
        row, col = divmod(bit, COLS)
        r, g, b = frame[int((row + 0.5) * height / ROWS), int((col + 0.5) * width / COLS)].astype(int)
        if r > 128:
            assert b < 80 and g < 80, "a set block should be red: channels swapped?"
            number |= 1 << bit
    return number


def _write_video(path, frames: int, fps: float, fourcc: str) -> str:
    """A file of coded frames: frame i spells i."""
    return write_video(path, frames, fps, (COLS * BLOCK, ROWS * BLOCK), fourcc, frame=_coded_frame)


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> str:
    """10 s at 30 fps, mp4v in .mp4."""
    return _write_video(tmp_path_factory.mktemp("video") / "clip.mp4", 300, 30.0, "mp4v")


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory) -> str:
    """2000 frames (66.7 s) at 30 fps, MJPG in .avi."""
    return _write_video(tmp_path_factory.mktemp("video") / "long.avi", 2000, 30.0, "MJPG")


def _all_frames(path: str) -> list[np.ndarray]:
    capture = cv2.VideoCapture(path)
    frames = []
    while (result := capture.read())[0]:
        frames.append(cv2.cvtColor(result[1], cv2.COLOR_BGR2RGB))
    capture.release()
    return frames


@pytest.mark.parametrize("kwargs", [{}, {"fps": 1.0, "video_start": 2.0, "video_end": 6.0}, {"nframes": 6}])
def test_file_keeps_the_planned_frames(clip, kwargs):
    options = VideoOptions(**kwargs)
    plan = plan_frames(300, 30.0, 48, 64, options)
    video = load_video(clip, options)
    assert video.frames.shape == (len(plan.indices), plan.height, plan.width, 3)
    assert video.frames.dtype == np.uint8
    assert [_read_number(frame) for frame in video.frames] == plan.indices
    assert video.source_fps == 30.0
    assert video.timestamps == [i / 30.0 for i in plan.indices]
    groups = video.group_timestamps()
    assert groups == Qwen3VLProcessor._calculate_timestamps(None, list(plan.indices), 30.0, 2)
    assert groups == pytest.approx(
        [(a + b) / 2 for a, b in zip(video.timestamps[::2], video.timestamps[1::2], strict=True)]
    )


def test_default_sampling_of_a_file(clip):
    """2 frames per second of a 10 s clip: 20 frames, 10 temporal groups, upscaled to the 128-token floor."""
    video = load_video(clip)
    assert video.frames.shape == (20, 320, 448, 3)
    assert [f"{t:.1f}" for t in video.group_timestamps()][:3] == ["0.3", "1.3", "2.4"]


def test_frame_list_sampled_on_request_equals_the_file(clip):
    """Asked to sample (fps), the list is the whole video at its frame rate: same frames kept, same
    pixels, same times as the file."""
    from_file = load_video(clip)
    frames = _all_frames(clip)
    for source in (frames, [Image.fromarray(f) for f in frames]):
        from_list = load_video(source, VideoOptions(fps=2.0), fps=30.0)
        np.testing.assert_array_equal(from_list.frames, from_file.frames)
        assert from_list.timestamps == from_file.timestamps


@pytest.mark.parametrize("count", [1, 4, 5])
def test_a_frame_list_is_taken_as_sampled(count):
    """As qwen-vl-utils takes a list of frames: every frame kept, an odd count padded with the last frame
    (5 frames: 3 temporal groups; 1 frame: 1), the padded list numbered 0..n at the list's frame rate
    (default 2 per second, its `sample_fps`)."""
    frames = [_coded_frame(i) for i in range(count)]
    video = load_video(frames)
    padded = count + count % 2
    assert len(video.frames) == padded
    np.testing.assert_array_equal(video.frames[count - 1], video.frames[padded - 1])
    assert video.timestamps == [i / 2.0 for i in range(padded)]
    assert len(video.group_timestamps()) == padded // 2
    assert load_video(frames, fps=4.0).timestamps == [i / 4.0 for i in range(padded)]


# ---- bounded memory: only kept frames are ever retrieved -----------------------------------------------


class _CountingCapture:
    """cv2.VideoCapture that counts calls and can misreport properties (wrong or missing metadata)."""

    def __init__(self, path, properties=None, frames_in_stream=None, seek=None):
        self._capture = _REAL_CAPTURE(path)
        self._properties = properties or {}
        self._left = frames_in_stream
        self._seek = seek  # "refused", or how many frames short of the target a seek lands
        self.grabs = self.retrieves = self.reads = self.seeks = 0

    def grab(self):
        self.grabs += 1
        if self._left is not None:
            if self._left <= 0:
                return False
            self._left -= 1
        return self._capture.grab()

    def retrieve(self, *args):
        self.retrieves += 1
        return self._capture.retrieve(*args)

    def read(self, *args):
        self.reads += 1
        return self._capture.read(*args)

    def set(self, prop, value):
        if prop != cv2.CAP_PROP_POS_FRAMES:
            return self._capture.set(prop, value)
        self.seeks += 1
        if self._seek == "refused":
            return False
        return self._capture.set(prop, value - (self._seek or 0))

    def get(self, prop):
        return self._properties.get(prop, self._capture.get(prop))

    def __getattr__(self, name):
        return getattr(self._capture, name)


_REAL_CAPTURE = cv2.VideoCapture


@pytest.fixture
def counting(monkeypatch):
    """Install _CountingCapture (with optional misreported properties); returns the list of captures it
    will make."""

    def install(properties=None, frames_in_stream=None, seek=None):
        made = []

        def make(path, *raw_mode):
            if raw_mode:  # the keyframe scan reads packets only: not counted
                return _REAL_CAPTURE(path, *raw_mode)
            made.append(_CountingCapture(path, properties, frames_in_stream, seek))
            return made[-1]

        monkeypatch.setattr(cv2, "VideoCapture", make)
        return made

    return install


def test_long_file_is_read_forward_and_only_kept_frames_retrieved(long_clip, counting):
    made = counting()
    video = load_video(long_clip)
    plan = plan_frames(2000, 30.0, 48, 64, VideoOptions())
    assert len(plan.indices) == 132
    assert [_read_number(f) for f in video.frames] == plan.indices
    (capture,) = made
    assert (capture.retrieves, capture.reads, capture.seeks) == (132, 0, 0)
    assert capture.grabs == 2000


def test_long_gaps_are_seeked_over(long_clip, counting):
    made = counting()
    video = load_video(long_clip, VideoOptions(nframes=4))
    assert [_read_number(f) for f in video.frames] == [0, 666, 1333, 1999]
    (capture,) = made
    assert capture.retrieves == 4 and capture.seeks == 3 and capture.grabs == 4


@pytest.mark.parametrize("seek, grabs", [("refused", 2000), (10, 34)])
def test_a_seek_that_is_refused_or_lands_short_still_gives_the_right_frames(long_clip, counting, seek, grabs):
    made = counting(seek=seek)
    video = load_video(long_clip, VideoOptions(nframes=4))
    assert [_read_number(f) for f in video.frames] == [0, 666, 1333, 1999]
    assert made[0].grabs == grabs


def _write_h264(path, frames: int, fps: int, keyint: int) -> str:
    """H.264 (x264 through PyAV, which qwen-vl-utils brings) with B-frames and a keyframe every `keyint`
    frames: the long keyframe intervals of camera and web video, which OpenCV's writers cannot make."""
    import av

    with av.open(str(path), "w") as container:
        params = f"keyint={keyint}:min-keyint={keyint}:scenecut=0:bframes=3"
        stream = container.add_stream("libx264", rate=fps, options={"x264-params": params})
        stream.width, stream.height, stream.pix_fmt = COLS * BLOCK, ROWS * BLOCK, "yuv420p"
        for number in range(frames):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(_coded_frame(number), format="rgb24")))
        container.mux(stream.encode())
    return str(path)


@pytest.fixture(scope="module")
def h264_clip(tmp_path_factory) -> str:
    """600 frames (20 s) at 30 fps, H.264 in .mp4, a keyframe every 100 frames."""
    return _write_h264(tmp_path_factory.mktemp("video") / "h264.mp4", 600, 30, 100)


@pytest.fixture(scope="module")
def mp4v_clip(tmp_path_factory) -> str:
    """600 frames at 30 fps, mp4v in .mp4 (OpenCV's writer: a keyframe every 12 frames)."""
    return _write_video(tmp_path_factory.mktemp("video") / "mp4v.mp4", 600, 30.0, "mp4v")


def test_keyframes_are_read_from_the_packets(h264_clip, mp4v_clip, long_clip):
    assert video_module._keyframes(h264_clip) == [0, 100, 200, 300, 400, 500]
    mp4v = video_module._keyframes(mp4v_clip)
    assert mp4v[0] == 0 and max(np.diff(mp4v)) <= 12 and len(mp4v) >= 50
    assert video_module._keyframes(long_clip) == list(range(2000))  # MJPG: every frame


def test_a_seek_pays_only_past_a_keyframe_ahead_of_the_reading():
    """OpenCV's seek to frame i decodes from the last keyframe at or before i - 16: worth it only when that
    keyframe lies more than a seek's own cost beyond the frame sequential reading is at."""
    pays = video_module._seek_pays
    every_12, every_250 = list(range(0, 10_000, 12)), list(range(0, 10_000, 250))
    assert pays(every_12, 0, 140) and not pays(every_12, 100, 124)  # lands on 120 vs 108: 12 frames saved
    assert not pays(every_12, 114, 140)  # lands on 120: 6 frames saved, less than a seek costs
    assert not pays(every_250, 100, 240) and not pays(every_250, 100, 265)  # no keyframe in (100, i - 16]
    assert pays(every_250, 100, 300)  # lands on 250
    assert not pays(None, 0, 250) and pays(None, 0, 251)  # keyframes unknown: longer than any interval


@pytest.mark.parametrize("name", ["h264_clip", "mp4v_clip", "long_clip"])
@pytest.mark.parametrize("kwargs", [{"nframes": 8}, {"fps": 0.5}, {"nframes": 4, "video_start": 3.0}])
def test_seeking_gives_the_frames_of_a_sequential_decode(request, name, kwargs, counting):
    """Seeks land on the planned frames, pixel for pixel those of decoding every frame in order, whether
    the seek starts at a keyframe 16 frames early (MJPG), one of every 12 (mp4v) or, with B-frames,
    one of every 100 (H.264)."""
    path = request.getfixturevalue(name)
    sequential = _all_frames(path)
    total = len(sequential)
    plan = plan_frames(total, 30.0, 48, 64, VideoOptions(**kwargs))
    made = counting()
    capture = cv2.VideoCapture(path)
    for keyframes in (video_module._keyframes(path), list(range(total))):  # the file's; every frame
        decoded = list(video_module._decode(capture, plan.indices, keyframes))
        capture.set(cv2.CAP_PROP_POS_FRAMES, 0)
        assert [index for index, _ in decoded] == plan.indices
        for index, frame in decoded:
            np.testing.assert_array_equal(frame, sequential[index], err_msg=f"frame {index}")
    assert made[0].seeks > 2  # the seek path ran (its first call rewinds after each pass)


def test_a_long_file_seeks_only_where_a_keyframe_saves_decoding(h264_clip, counting):
    """4 frames of 600, keyframes every 100: every gap holds one, so each is seeked over; at 2 frames a
    second (gaps of 15) none is, and every frame is grabbed."""
    made = counting()
    video = load_video(h264_clip, VideoOptions(nframes=4))
    assert [_read_number(f) for f in video.frames] == [0, 200, 399, 599]
    assert made[0].seeks == 3 and made[0].grabs < 200
    made = counting()
    load_video(h264_clip)
    assert made[0].seeks == 0 and made[0].grabs == 600


@pytest.fixture
def in_parts(monkeypatch):
    """Long files read by 3 captures at once, from 50 frames of span (the defaults need minutes of video)."""
    monkeypatch.setattr(video_module, "READERS", 3)
    monkeypatch.setattr(video_module, "READER_MIN_FRAMES", 50)


def _one_capture(monkeypatch):
    monkeypatch.setattr(video_module, "READERS", 1)


@pytest.mark.parametrize("name", ["h264_clip", "mp4v_clip", "long_clip"])
@pytest.mark.parametrize("kwargs", [{"nframes": 24}, {}, {"fps": 1.0, "video_start": 2.0, "video_end": 13.0}])
def test_a_long_file_read_in_parts_gives_the_frames_of_one_capture(
    request, name, kwargs, counting, in_parts, monkeypatch
):
    """Three captures, each seeking to its part of the plan (with B-frames: H.264), give the frames and
    times of one capture reading forward, pixel for pixel."""
    path = request.getfixturevalue(name)
    made = counting()
    parts = load_video(path, VideoOptions(**kwargs))
    assert len(made) == 4 and all(capture.retrieves for capture in made[1:])  # metadata, then 3 parts
    assert sum(capture.seeks > 0 for capture in made[1:]) >= 2  # the parts after the first
    _one_capture(monkeypatch)
    whole = load_video(path, VideoOptions(**kwargs))
    np.testing.assert_array_equal(parts.frames, whole.frames)
    assert parts.timestamps == whole.timestamps


def test_a_stream_shorter_than_its_metadata_read_in_parts_keeps_what_one_capture_keeps(
    long_clip, counting, in_parts, monkeypatch
):
    """The file claims 4000 frames and holds 2000: the parts past its end read nothing, and the frames
    kept are one capture's: the parts in order up to the first that ended early."""
    counting({cv2.CAP_PROP_FRAME_COUNT: 4000})
    parts = load_video(long_clip, VideoOptions(nframes=30))
    _one_capture(monkeypatch)
    whole = load_video(long_clip, VideoOptions(nframes=30))
    assert 10 < len(whole.frames) < 30
    np.testing.assert_array_equal(parts.frames, whole.frames)
    assert parts.timestamps == whole.timestamps


def test_reading_in_parts_reports_progress_and_stops_every_part_on_ctrl_c(long_clip, counting, in_parts):
    seen = []
    load_video(long_clip, VideoOptions(nframes=60), progress=lambda done, total: seen.append((done, total)))
    assert seen == [(n, 60) for n in range(1, 61)]

    def interrupt(done, total):
        if done == 6:
            raise KeyboardInterrupt

    made = counting()
    with pytest.raises(KeyboardInterrupt):
        load_video(long_clip, VideoOptions(nframes=60), progress=interrupt)
    assert sum(capture.retrieves for capture in made) < 12  # each part stopped at its next frame


def test_repeated_index_repeats_the_frame(clip):
    capture = cv2.VideoCapture(clip)
    decoded = list(video_module._decode(capture, [0, 0, 3, 3]))
    capture.release()
    assert [index for index, _ in decoded] == [0, 0, 3, 3]
    assert [_read_number(frame) for _, frame in decoded] == [0, 0, 3, 3]


def test_missing_frame_count_is_counted(clip, counting):
    expected = load_video(clip)
    for reported in (0, -1):
        made = counting({cv2.CAP_PROP_FRAME_COUNT: reported})
        video = load_video(clip)
        np.testing.assert_array_equal(video.frames, expected.frames)
        assert video.timestamps == expected.timestamps
        assert len(made) == 3  # opened, counted by grabbing, opened again to read


def test_stream_shorter_than_its_metadata_keeps_what_was_read(clip, counting):
    counting({cv2.CAP_PROP_FRAME_COUNT: 600})  # claims 20 s; the stream ends after 300 frames
    video = load_video(clip)
    planned = plan_frames(600, 30.0, 48, 64, VideoOptions()).indices
    read = [i for i in planned if i < 300]
    assert len(read) % 2 == 0
    assert [_read_number(f) for f in video.frames] == read
    assert video.timestamps == [i / 30.0 for i in read]


def test_odd_number_of_frames_read_repeats_the_last(clip, counting):
    planned = plan_frames(300, 30.0, 48, 64, VideoOptions()).indices
    counting(frames_in_stream=planned[5] + 1)  # the stream gives out after the 6th planned frame ...
    video = load_video(clip)
    counting(frames_in_stream=planned[4] + 1)  # ... or after the 5th
    odd = load_video(clip)
    assert [_read_number(f) for f in video.frames] == planned[:6]
    assert [_read_number(f) for f in odd.frames] == planned[:5] + planned[4:5]
    assert odd.timestamps == [i / 30.0 for i in planned[:5] + planned[4:5]]


def test_fps_overrides_a_missing_frame_rate(clip, counting):
    counting({cv2.CAP_PROP_FPS: 0.0})
    with pytest.raises(Qwen3VLError, match="frame rate.*fps="):
        load_video(clip)
    video = load_video(clip, fps=15.0)  # the clip read as 20 s at 15 fps: 40 frames
    assert [_read_number(f) for f in video.frames] == plan_frames(300, 15.0, 48, 64, VideoOptions()).indices
    assert video.timestamps[-1] == 299 / 15.0


# ---- errors ------------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(Qwen3VLError, match="nope.mp4: no such video file"):
        load_video(tmp_path / "nope.mp4")


def test_text_file_named_mp4(tmp_path):
    path = tmp_path / "notes.mp4"
    path.write_text("not a video\n")
    with pytest.raises(Qwen3VLError, match="notes.mp4: OpenCV cannot open it"):
        load_video(path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.mp4"
    path.write_bytes(b"")
    with pytest.raises(Qwen3VLError, match=r"empty.mp4: empty file \(0 bytes\)"):
        load_video(str(path))


def test_single_frame_video(tmp_path):
    path = _write_video(tmp_path / "one.avi", 1, 30.0, "MJPG")
    with pytest.raises(Qwen3VLError, match="one.avi: the video has 1 frame.*at least 2"):
        load_video(path)


def test_stream_without_readable_frames(clip, counting):
    counting(frames_in_stream=0)
    with pytest.raises(Qwen3VLError, match="clip.mp4: no readable video frames"):
        load_video(clip)


def test_time_range_beyond_the_video(clip):
    with pytest.raises(Qwen3VLError, match="clip.mp4: time range video_start=20.0.*fewer than 2 frames"):
        load_video(clip, VideoOptions(video_start=20.0))


def test_more_frames_asked_than_the_video_has(clip):
    with pytest.raises(Qwen3VLError, match="nframes=400: more than the 300 frames"):
        load_video(clip, VideoOptions(nframes=400))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"fps": 0}, "fps=0: must be > 0"),
        ({"fps": -1.5}, "fps=-1.5: must be > 0"),
        ({"fps": "2"}, "fps='2': must be a number"),
        ({"nframes": 1}, "nframes=1: must be >= 2"),
        ({"nframes": 2.5}, "nframes=2.5: must be an integer"),
        ({"fps": 1.0, "nframes": 4}, "fps and nframes: give one of them"),
        ({"min_frames": 0}, "min_frames=0: must be >= 1"),
        ({"min_frames": 10, "max_frames": 8}, r"max_frames=8: must be >= 2 and >= min_frames \(10\)"),
        ({"min_pixels": 0}, "min_pixels=0: must be > 0"),
        ({"max_pixels": -1}, "max_pixels=-1: must be > 0"),
        ({"total_pixels": 0}, "total_pixels=0: must be > 0"),
        ({"video_start": -1}, "video_start=-1: must be >= 0"),
        ({"video_start": 5.0, "video_end": 5.0}, r"video_end=5.0: must be > video_start \(5.0 s\)"),
        ({"video_start": 5.0, "video_end": 3.0}, r"video_end=3.0: must be > video_start \(5.0 s\)"),
        ({"video_end": 0}, r"video_end=0: must be > video_start \(0 s\)"),
    ],
)
def test_options_out_of_range(kwargs, message):
    with pytest.raises(Qwen3VLError, match="video option.* " + message):
        VideoOptions(**kwargs)


def test_frame_list_errors():
    frame = _coded_frame(1)
    with pytest.raises(Qwen3VLError, match="an empty list of frames is not a video"):
        load_video([])
    with pytest.raises(Qwen3VLError, match="source fps=0: must be a number > 0"):
        load_video([frame] * 4, fps=0)
    with pytest.raises(Qwen3VLError, match=r"list of 4 frames: frames of different sizes"):
        load_video([frame] * 3 + [frame[:32]], fps=30)
    with pytest.raises(Qwen3VLError, match="frame 1 must be a PIL image or an HxWx3 uint8 array"):
        load_video([frame, frame.astype(np.float32)], fps=30)
    with pytest.raises(Qwen3VLError, match="list of 1 frames: the video has 1 frame"):
        load_video([frame], VideoOptions(fps=2.0), fps=30)  # sampling asks for 2 frames at least
    with pytest.raises(Qwen3VLError, match="frame of size 500x2: aspect ratio over 200"):
        load_video([np.zeros((2, 500, 3), np.uint8)] * 4, fps=30)
    with pytest.raises(Qwen3VLError, match="unsupported video input of type int"):
        load_video(3)


def test_max_pixels_below_min_pixels_scales_the_frames_to_fit():
    """Refused by qwen-vl-utils, taken by transformers: the frames are scaled to fit max_pixels."""
    plan = plan_frames(100, 25.0, 720, 1280, VideoOptions(min_pixels=300_000, max_pixels=200_000))
    beta = (720 * 1280 / 200_000) ** 0.5  # transformers' smart_resize, its max_pixels branch
    assert (plan.height, plan.width) == (720 / beta // 32 * 32, 1280 / beta // 32 * 32) == (320, 576)


def test_an_odd_frame_list_becomes_whole_temporal_groups_in_the_prompt(tiny_f32):
    processor = tiny_f32[1]
    frames = [_coded_frame(i) for i in range(5)]
    inputs = processor("What happens?", videos=frames)
    assert inputs["video_grid_thw"][0][0] == 3
    one = processor("What happens?", videos=[[frames[0]]])
    assert one["video_grid_thw"][0][0] == 1


def test_reading_a_file_reports_each_kept_frame(clip, tiny_f32):
    """A long file takes a while to read: `progress` sees every kept frame, and through generation the
    "reading" stage comes first, before what the video became and the vision tower's blocks."""
    seen = []
    video = load_video(clip, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(i, len(video.frames)) for i in range(1, len(video.frames) + 1)]

    from mlx_qwen3vl import generate

    model, processor = tiny_f32
    events = []
    options = {"nframes": 4, "max_tokens": 1, "progress": events.append}
    generate(model, processor, "What happens?", videos=[clip], **options)
    stages = [e.stage for e in events]
    assert stages[:5] == ["reading"] * 4 + ["media"] and "vision" in stages
    assert [(e.done, e.total) for e in events[:4]] == [(1, 4), (2, 4), (3, 4), (4, 4)]
