"""The chat page served at `/`: three static files shipped in the package (`page/`), run as they are (no
build step), and a Content-Security-Policy under which the page can load and reach nothing but this
server (a Mac on a plane must work, and a page that cannot call elsewhere cannot leak a conversation).

The page is the server's own origin, so its requests pass the guard as same-origin ones (guard.py); its
files hold no secret and are served without the API key, which the page asks for when the API wants it.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from starlette.responses import Response

FOLDER = Path(__file__).parent / "page"
# Each path the page is served under: its file and type. Nothing else is served from the folder.
FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/page/page.js": ("page.js", "text/javascript; charset=utf-8"),
    "/page/page.css": ("page.css", "text/css; charset=utf-8"),
}
# Images and videos the user adds are shown from data: and blob: URLs; everything else only from here.
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data: blob:",
        "media-src 'self' data: blob:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # a new version of the package is served at once
}


@cache
def _content(name: str) -> bytes:
    return (FOLDER / name).read_bytes()


def page_file(path: str) -> Response:
    """The response for one of the page's `FILES`."""
    name, media_type = FILES[path]
    return Response(_content(name), media_type=media_type, headers=HEADERS)
