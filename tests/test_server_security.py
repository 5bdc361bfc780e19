"""The server under hostile pages and heavy requests: bodies over the limit refused as they arrive, web
origins and Host names not allowed refused before any work (CORS only for allowed origins), media URLs
fetched only from public addresses over http(s) under one deadline, local files only under the allowed
directory, downloads that never hold up requests with inline media, and every client mistake a 4xx in
OpenAI's shape with one line. Web servers of the tests' own on the loopback address play the hostile
media hosts (the server under test allows private URLs where it must reach them)."""

from __future__ import annotations

import http.client
import http.server
import ipaddress
import json
import socket
import socketserver
import ssl
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from test_server import HANG, KEY, Server, ask, data_url, image_part, png, user

import server as server_script
from mlx_qwen3vl import Qwen3VLError
from mlx_qwen3vl.serving import fetch as fetch_module
from mlx_qwen3vl.serving.fetch import DOWNLOADS
from mlx_qwen3vl.serving.guard import Access
from mlx_qwen3vl.serving.media import MediaPolicy, fetch

ALLOWED_ORIGIN = "https://chat.example"
# A self-signed certificate (and its key) for the name localhost, valid for a century: the https host.
LOCALHOST_TLS = Path(__file__).parent / "data" / "tls" / "localhost.pem"
LIMIT = 20_000  # bytes of request body, for the size tests


class Media(http.server.BaseHTTPRequestHandler):
    """A hostile media host: counts every request by path; /cat.png answers an image, /ftp and /file
    redirect out of http, /to-other redirects to another loopback address, /drip sends a byte at a
    time, /stall waits until the tests let it go."""

    hits: Counter = Counter()
    released = threading.Event()
    dripped, drip_ended = 0, threading.Event()  # bytes of /drip sent before the client went away

    def do_GET(self):
        self.hits[self.path] += 1
        if self.path in REDIRECTS:
            self.send_response(302)
            self.send_header("Location", REDIRECTS[self.path].format(port=self.server.server_address[1]))
            self.end_headers()
        elif self.path == "/drip":
            self.send_response(200)
            self.send_header("Content-Length", str(DRIP))
            self.end_headers()
            try:
                for _ in range(DRIP):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    self.dripped += 1
                    time.sleep(0.1)
            finally:
                self.drip_ended.set()
        elif self.path == "/stall":
            self.released.wait(HANG)
            self.send_error(404)
        elif self.path == "/cat.png":
            self.send_response(200)
            self.send_header("Content-Length", str(len(CAT)))
            self.end_headers()
            self.wfile.write(CAT)
        else:
            self.send_error(404)

    def log_message(self, *args):
        pass

    def handle(self):
        try:
            super().handle()
        except (BrokenPipeError, ConnectionResetError):  # the server under test gave up: as it should
            pass


class QuietServer(socketserver.ThreadingTCPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # a client that refused the certificate, or went away: what these tests make clients do


CAT = png(3)
DRIP = 60  # bytes sent by /drip, one a tenth of a second
REDIRECTS = {
    "/ftp": "ftp://127.0.0.1:{port}/cat.png",
    "/file": "file:///etc/passwd",
    "/to-other": "http://127.0.0.2:{port}/cat.png",
}


@pytest.fixture(scope="module")
def media_host():
    httpd = QuietServer(("127.0.0.1", 0), Media)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1]
    Media.released.set()
    httpd.shutdown()


@pytest.fixture(scope="module")
def tls_media_host():
    """The same host over https, with the localhost certificate."""
    httpd = QuietServer(("127.0.0.1", 0), Media)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(LOCALHOST_TLS)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1]
    httpd.shutdown()


@pytest.fixture(scope="module")
def guarded(tiny_checkpoint, tmp_path_factory):
    """A server with a small body limit, one web origin allowed besides the loopback ones, private URLs
    allowed (to reach the tests' media host) and no deadline to speak of (the stalls end when the tests
    say)."""
    access = Access(origins=(ALLOWED_ORIGIN,), max_request_bytes=LIMIT)
    s = Server(tiny_checkpoint, access=access, allow_private_urls=True, total_timeout=HANG)
    yield s
    s.close()


@pytest.fixture(scope="module")
def strict(tiny_checkpoint):
    """A server as started by default: public URLs only."""
    s = Server(tiny_checkpoint, connect_timeout=1.0, total_timeout=2.0)
    yield s
    s.close()


def send(server, method: str, path: str, body: bytes | None = None, **headers):
    """A raw HTTP request with these headers (and the API key): status, headers, parsed JSON or None."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=HANG)
    headers = {"Authorization": f"Bearer {KEY}"} | {k.replace("_", "-"): v for k, v in headers.items()}
    connection.request(method, path, body=body, headers=headers)
    response = connection.getresponse()
    data = response.read()
    connection.close()
    return response.status, response.headers, json.loads(data) if data else None


def refusal(status_body: tuple, status: int) -> str:
    """The refusal's message, after checking its status and OpenAI's shape (one line)."""
    got, _, body = status_body
    assert got == status, body
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert "\n" not in body["error"]["message"] and "\r" not in body["error"]["message"]
    return body["error"]["message"]


def chat(text: str = "Hi") -> bytes:
    return json.dumps({"messages": [user(text)], "max_tokens": 2, "temperature": 0}).encode()


# ---- A: request size -------------------------------------------------------------------------------------


def test_a_body_over_the_limit_is_refused_as_it_arrives_and_the_server_goes_on(guarded):
    # A Content-Length over the limit: refused before a byte of the body is sent.
    with socket.create_connection(("127.0.0.1", guarded.port), timeout=HANG) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {KEY}\r\nContent-Length: {10**9}\r\n\r\n".encode()
        )
        head = sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 413"), head[:80]
    # A body without a length (chunked) that grows past the limit: counted as it comes, refused; without
    # the API key, refused for that before it is read.
    body = chat("word " * LIMIT)
    for key, status in ((KEY, 413), (None, 401)):
        connection = http.client.HTTPConnection("127.0.0.1", guarded.port, timeout=HANG)
        chunks = (body[i : i + 4096] for i in range(0, len(body), 4096))
        headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
        connection.request("POST", "/v1/chat/completions", body=chunks, headers=headers, encode_chunked=True)
        response = connection.getresponse()
        message = refusal((response.status, None, json.loads(response.read())), status)
        connection.close()
        assert status == 401 or f"{LIMIT:,} bytes" in message
    assert isinstance(ask(guarded, [user("Hi")]), str)  # and the next request is answered


# ---- B: origins and hosts ----------------------------------------------------------------------------------


def test_a_foreign_origin_is_refused_before_any_work(guarded, monkeypatch):
    """A page's text/plain POST (no preflight): refused, and the engine never sees it."""
    jobs = []
    monkeypatch.setattr(guarded.engine, "submit", jobs.append)
    for origin in ("https://evil.example", "null", "http://localhost.evil.example"):
        reply = send(
            guarded, "POST", "/v1/chat/completions", chat(), Origin=origin, Content_Type="text/plain"
        )
        assert "not allowed" in refusal(reply, 403)
        assert "access-control-allow-origin" not in reply[1]
    preflight = send(
        guarded,
        "OPTIONS",
        "/v1/chat/completions",
        Origin="https://evil.example",
        Access_Control_Request_Method="POST",
    )
    assert preflight[0] == 403 and "access-control-allow-origin" not in preflight[1]
    assert jobs == []


def test_a_foreign_host_is_refused(guarded):
    """A page on a name of its own that resolves to 127.0.0.1 (DNS rebinding) sends that name as Host."""
    assert "not a name of this server" in refusal(
        send(guarded, "GET", "/v1/models", Host="evil.example"), 403
    )
    assert "not a name of this server" in refusal(
        send(guarded, "POST", "/v1/chat/completions", chat(), Host="evil.example:8080"), 403
    )
    for host in ("localhost:8080", "127.0.0.1", "[::1]:1234"):
        assert send(guarded, "GET", "/v1/models", Host=host)[0] == 200


def test_allowed_origins_get_cors_headers_and_their_answer(guarded):
    for origin in (ALLOWED_ORIGIN, "http://localhost:5173", "http://127.0.0.1:3000"):
        preflight = send(
            guarded,
            "OPTIONS",
            "/v1/chat/completions",
            Origin=origin,
            Access_Control_Request_Method="POST",
            Access_Control_Request_Headers="authorization, content-type",
        )
        assert preflight[0] == 204
        assert preflight[1]["access-control-allow-origin"] == origin
        assert "authorization" in preflight[1]["access-control-allow-headers"].lower()
        status, headers, body = send(guarded, "POST", "/v1/chat/completions", chat(), Origin=origin)
        assert status == 200 and body["choices"][0]["message"]["content"]
        assert headers["access-control-allow-origin"] == origin
    status, headers, _ = send(guarded, "POST", "/v1/chat/completions", chat())  # no Origin: curl, SDKs
    assert status == 200 and "access-control-allow-origin" not in headers


# ---- C: outbound fetches -----------------------------------------------------------------------------------


def refused_fetch(url: str, **policy) -> str:
    with pytest.raises(Qwen3VLError) as e:
        fetch(url, MediaPolicy(**({"connect_timeout": 2.0, "total_timeout": 5.0} | policy)), "image 1")
    assert "\n" not in str(e.value)
    return str(e.value)


def test_redirects_out_of_http_are_refused(media_host):
    for path in ("/ftp", "/file"):
        url = f"http://127.0.0.1:{media_host}{path}"
        assert "only http and https" in refused_fetch(url, allow_private_urls=True)
    assert (
        fetch(f"http://127.0.0.1:{media_host}/cat.png", MediaPolicy(allow_private_urls=True), "i").data == CAT
    )


def test_every_hop_is_checked(media_host, monkeypatch):
    """A redirect from an address taken as public to a private one is refused before it is followed."""
    monkeypatch.setattr(fetch_module, "_public", lambda a: a == ipaddress.ip_address("127.0.0.1"))
    message = refused_fetch(f"http://127.0.0.1:{media_host}/to-other")
    assert "private, local or reserved address (127.0.0.2)" in message


def test_private_addresses_in_every_spelling_are_refused_unfetched(media_host):
    Media.hits.clear()
    hosts = [
        "127.0.0.1",
        "127.1",
        "2130706433",
        "0x7f000001",
        "017700000001",
        "localhost",
        "localhost.",
        "[::1]",
        "[::ffff:127.0.0.1]",
        "0.0.0.0",
        "169.254.169.254",
        "10.0.0.1",
        "[fe80::1]",
    ]
    for host in hosts:
        message = refused_fetch(f"http://{host}:{media_host}/cat.png")
        assert "private, local or reserved address" in message or "does not resolve" in message, message
    assert "credentials" in refused_fetch(
        f"http://user:pw@127.0.0.1:{media_host}/cat.png", allow_private_urls=True
    )
    assert Media.hits == Counter()


def test_a_dripping_download_stops_at_the_deadline(media_host):
    """A byte every tenth of a second: every read is quick, but the download as a whole is cut off at
    its deadline, the connection closed long before the host has sent all it would."""
    Media.dripped = 0
    message = refused_fetch(
        f"http://127.0.0.1:{media_host}/drip", allow_private_urls=True, connect_timeout=5.0, total_timeout=1.0
    )
    assert "deadline of 1 s" in message
    assert Media.drip_ended.wait(HANG)
    assert Media.dripped < DRIP


def test_https_connects_to_the_checked_address_and_verifies_the_name(tls_media_host, monkeypatch):
    """The connection goes to the address checked, while the certificate is verified for the URL's name
    (unknown issuer refused; trusted, the download goes through, under the same deadline)."""
    url = f"https://localhost:{tls_media_host}"
    assert "CERTIFICATE_VERIFY_FAILED" in refused_fetch(f"{url}/cat.png", allow_private_urls=True)
    default_context = ssl.create_default_context

    def trusting(*args, **kwargs):
        context = default_context(*args, **kwargs)
        context.load_verify_locations(LOCALHOST_TLS)
        return context

    monkeypatch.setattr(ssl, "create_default_context", trusting)
    assert fetch(f"{url}/cat.png", MediaPolicy(allow_private_urls=True), "image 1").data == CAT
    message = refused_fetch(f"{url}/drip", allow_private_urls=True, connect_timeout=5.0, total_timeout=1.0)
    assert "deadline of 1 s" in message
    assert "private, local or reserved address" in refused_fetch(f"{url}/cat.png")


def test_the_server_refuses_private_urls_by_default(strict, media_host):
    Media.hits.clear()
    body = json.dumps({"messages": [user(image_part(f"http://127.0.0.1:{media_host}/cat.png"), "What?")]})
    message = refusal(send(strict, "POST", "/v1/chat/completions", body.encode()), 400)
    assert "--allow-private-urls" in message
    assert Media.hits == Counter()


def test_stalled_downloads_never_hold_up_requests_with_inline_media(guarded, media_host):
    """More stalled downloads than any default thread pool has threads: a request carrying its image
    inline is answered meanwhile."""
    Media.hits.clear()
    stalled = json.dumps({"messages": [user(image_part(f"http://127.0.0.1:{media_host}/stall"))]}).encode()
    with ThreadPoolExecutor(40) as pool:
        waiting = [pool.submit(send, guarded, "POST", "/v1/chat/completions", stalled) for _ in range(40)]
        deadline = time.monotonic() + HANG
        while Media.hits["/stall"] < DOWNLOADS:
            assert time.monotonic() < deadline, Media.hits
            time.sleep(0.05)
        try:
            assert ask(guarded, [user(image_part(data_url(png(4, (32, 32)))), "What?")])
        finally:
            Media.released.set()
        assert all(w.result()[0] == 400 for w in waiting)


# ---- D: local files ----------------------------------------------------------------------------------------


def test_local_files_only_under_the_allowed_directory(tmp_path):
    served, elsewhere = tmp_path / "served", tmp_path / "elsewhere"
    served.mkdir(), elsewhere.mkdir()
    (served / "cat.png").write_bytes(CAT)
    (elsewhere / "secret.png").write_bytes(CAT)
    (served / "link.png").symlink_to(elsewhere / "secret.png")
    policy = MediaPolicy(allow_local_files=served)
    assert fetch(str(served / "cat.png"), policy, "image 1").data == CAT
    assert fetch("cat.png", policy, "image 1").data == CAT  # relative to the directory
    outside = [
        str(elsewhere / "secret.png"),
        str(served / "link.png"),
        str(served / "../elsewhere/secret.png"),
        f"file://{elsewhere / 'secret.png'}",
    ]
    missing = [str(elsewhere / "missing.png"), str(served / "missing.png")]
    messages = {refused_fetch(p, allow_local_files=served).replace(p, "PATH") for p in outside + missing}
    assert len(messages) == 1  # the same words whether the file exists or not


def test_server_py_checks_its_new_options(capsys, tmp_path):
    cases = {
        ("--allow-local-files", str(tmp_path / "nothing")): "is not a directory",
        ("--allowed-origins", "ftp://example.com"): "is not an origin",
        ("--allowed-origins", "https://example.com/path"): "is not an origin",
        ("--allowed-hosts", "user@example.com"): "is not a host name",
        ("--max-request-bytes", "0"): "not a positive whole number",
    }
    for argv, message in cases.items():
        with pytest.raises(SystemExit) as e:
            server_script.parse_args(list(argv))
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and err.count("\n") == 1, err
    args = server_script.parse_args(
        [
            "--allowed-origins",
            f"{ALLOWED_ORIGIN},http://a.example:8",
            "--allowed-origins",
            "*",
            "--allowed-hosts",
            "a.example",
            "--allow-local-files",
            str(tmp_path),
        ]
    )
    assert args.allowed_origins == [ALLOWED_ORIGIN, "http://a.example:8", "*"]
    assert args.allowed_hosts == ["a.example"] and args.allow_local_files == tmp_path.resolve()


# ---- E: client mistakes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, message",
    [
        (
            f'{{"messages": [{{"role": "user", "content": "Hi"}}], "metadata": {"[" * 1000}{"]" * 1000}}}',
            "nests",
        ),
        ('{"messages": [{"role": "user", "content": "a \\ud800 b"}]}', "lone UTF-16 surrogate"),
        (
            json.dumps({"messages": [user(image_part(data_url(png(4, (32, 32)))))], "max_pixels": [1, 2]}),
            "max_pixels",
        ),
        (json.dumps({"messages": [user(image_part("http://127.0.0.1:9/a\r\nX-Evil: 1"))]}), "control"),
        (json.dumps({"messages": [user(image_part("/tmp/a\nb\0c"))]}), "control"),
        (json.dumps({"messages": [user(image_part("http://[::1/cat.png"))]}), "not a valid URL"),
    ],
    ids=["deep", "surrogate", "max_pixels-list", "crlf-url", "crlf-path", "bad-ipv6-url"],
)
def test_client_mistakes_are_400s_with_one_line(guarded, body, message):
    assert message in refusal(send(guarded, "POST", "/v1/chat/completions", body.encode()), 400)


def test_unknown_routes_and_wrong_methods_answer_in_openais_shape(guarded):
    assert "no such route" in refusal(send(guarded, "GET", "/v1/nothing"), 404)
    assert "GET is not allowed" in refusal(send(guarded, "GET", "/v1/chat/completions"), 405)
