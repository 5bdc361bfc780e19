"""Images and videos named in requests: fetched under limits a server must keep, and identified by their
content, so that a resent image is found in the caches without being decoded again.

An http(s) URL is downloaded by fetch.py (public addresses only, one deadline, at most `max_bytes`); a
`data:` URL is decoded under the same size limit; a local path or `file:` URL only under the directory the
server allows (a client must not read the server's other files, nor learn which exist). Videos are
written to a private temporary file for OpenCV, removed after decoding.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from ..errors import Qwen3VLError
from ..media import MediaItem
from ..processor import Processor
from ..turn import Turn
from .fetch import download, remote
from .protocol import Request

CONNECT_TIMEOUT = 10.0  # seconds to open the connection (and between two reads)
TOTAL_TIMEOUT = 60.0  # seconds for the whole download
# The pixel rows of recently read images and videos kept for resent ones: a photo's are tens of MB, a
# video's up to hundreds.
MEDIA_CACHE_BYTES = 512 * 10**6


@dataclass(frozen=True)
class MediaPolicy:
    """What the server lets a request name: `allow_local_files`, the directory whose files requests may
    name (None: none); `allow_private_urls`, URLs of this machine and its private networks too."""

    max_bytes: int = 20 * 10**6
    allow_local_files: Path | None = None
    allow_private_urls: bool = False
    connect_timeout: float = CONNECT_TIMEOUT
    total_timeout: float = TOTAL_TIMEOUT


@dataclass(frozen=True)
class Fetched:
    """A medium's bytes and their digest (its identity in the caches)."""

    data: bytes
    digest: str


def fetch(source: str, policy: MediaPolicy, what: str) -> Fetched:
    """The bytes behind a URL, data: URL or (allowed) local path. One Qwen3VLError line otherwise."""
    if not isinstance(source, str) or not source:
        raise Qwen3VLError(f"{what}: expected a URL string")
    if not source.isprintable():  # CR/LF would split the request a URL goes into, and the error's line
        raise Qwen3VLError(f"{what}: the URL holds a control or unprintable character")
    if source.startswith("data:"):
        data = _data_url(source, policy, what)
    elif remote(source):
        data = download(source, policy, what)
    else:
        data = _local(source, policy, what)
    return Fetched(data, hashlib.sha256(data).hexdigest())


def _data_url(source: str, policy: MediaPolicy, what: str) -> bytes:
    header, _, payload = source.partition(",")
    if not header.endswith(";base64"):
        raise Qwen3VLError(f"{what}: a data: URL must be base64-encoded (data:<type>;base64,...)")
    if len(payload) * 3 // 4 > policy.max_bytes:
        raise Qwen3VLError(f"{what}: the data: URL holds more than {policy.max_bytes:,} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise Qwen3VLError(f"{what}: the data: URL is not valid base64") from None


def _local(source: str, policy: MediaPolicy, what: str) -> bytes:
    """A file under the allowed directory, links resolved first (a link inside may point outside). A
    file outside and a missing file get the same message: a client learns nothing of the rest of the
    machine."""
    if policy.allow_local_files is None:
        raise Qwen3VLError(
            f"{what}: local files are not served (start the server with --allow-local-files DIR); "
            "send an http(s) or data: URL"
        )
    root = Path(policy.allow_local_files).resolve()
    try:
        path = (root / Path(source.removeprefix("file://")).expanduser()).resolve()
    except (OSError, RuntimeError, ValueError):
        path = None
    if path is None or not path.is_relative_to(root) or not path.is_file():
        raise Qwen3VLError(f"{what}: {source}: no such file in the served directory")
    if path.stat().st_size > policy.max_bytes:
        raise Qwen3VLError(f"{what}: {source} is over the limit of {policy.max_bytes:,} bytes")
    return path.read_bytes()


class VideoFile:
    """A video's bytes as a private temporary file for OpenCV, removed on exit."""

    def __init__(self, data: bytes):
        self.data = data

    def __enter__(self) -> str:
        handle, self.path = tempfile.mkstemp(prefix="mlx-qwen3vl-video-")
        with os.fdopen(handle, "wb") as file:
            file.write(self.data)
        return self.path

    def __exit__(self, *exc) -> None:
        Path(self.path).unlink(missing_ok=True)


class MediaReader:
    """Fetched images and videos read into `MediaItem`s with their options. Those of accepted turns are
    kept by content and options, the most recently used first out of `max_bytes` of pixel rows, so that
    a resent one (a chat client resends the whole conversation) is not decoded again. Nothing of a
    refused request is kept: its items are kept only once the engine took its turn (`keep`), and one
    larger than the whole budget never is. Used from the request threads at once (a lock guards the
    entries; two threads may read the same item twice, never wrongly)."""

    def __init__(self, processor: Processor, max_bytes: int = MEDIA_CACHE_BYTES):
        self.processor, self.max_bytes = processor, max_bytes
        self.read: OrderedDict[str, MediaItem] = OrderedDict()  # by digest, most recently used last
        self.nbytes = 0  # the kept items' pixel rows
        self.lock = threading.Lock()

    def turn(self, request: Request, fetched: list[Fetched]) -> Turn:
        """The request's turn: its images and videos read (or found read before), the template rendered,
        the prompt tokenized."""
        media = [
            self.item(ref.kind, data, ref.options) for ref, data in zip(request.media, fetched, strict=True)
        ]
        return Turn.from_messages(self.processor, request.messages, media, request.options)

    def item(self, kind: str, fetched: Fetched, options: dict) -> MediaItem:
        """An image or video from fetched bytes, read with these options, or as read before. Its digest
        (its identity here and in the prefix caches) is that of the bytes and the options: cheaper than
        the pixel rows', and as exact, since they make the rows."""
        # The options as JSON: they come from JSON, and any JSON value (a list given for max_pixels) makes
        # a key; the processor then refuses the wrong ones with their one line.
        digest = repr((kind, fetched.digest, json.dumps(options, sort_keys=True)))
        with self.lock:
            if digest in self.read:
                self.read.move_to_end(digest)
                return self.read[digest]
        if kind == "image":
            item = self.processor.read_media("image", fetched.data, options)
        else:
            with VideoFile(fetched.data) as path:
                item = self.processor.read_media("video", path, options)
        item.digest = digest
        return item

    def keep(self, media: list[MediaItem]) -> None:
        """Keep these images and videos (of a turn the engine took, or read for a client that asked what
        they become) for later requests, within the budget."""
        with self.lock:
            for item in media:
                size = item.pixel_values.nbytes
                if item.digest in self.read or size > self.max_bytes:
                    continue
                self.read[item.digest] = item
                self.nbytes += size
            while self.nbytes > self.max_bytes:
                _, dropped = self.read.popitem(last=False)
                self.nbytes -= dropped.pixel_values.nbytes
