"""A soak of server.py: many requests of every kind from a few clients at once, and the server process's
resident memory after the first hundred and at the end. A server that keeps something of each request
(refused, answered or abandoned) grows between the two; one that keeps only its bounded caches does not.

    python bench/soak.py                          # the tiny test model, 1,000 requests, 4 clients
    python bench/soak.py --model DIR --requests 2000 --save

The requests, in turn: text and image questions (images as inline data: URLs, from a pool so that some
are resent), streamed or not; conversations continued with their answer; streams dropped after a few
events and whole answers abandoned before they come; and refusals: images read large and then refused
(the prompt passes the context), too many stop strings, out-of-range options, broken JSON, broken images.
Each request's status is checked; a wrong one is counted and shown.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import presets  # noqa: E402
import serve  # noqa: E402
from inputs import noise_image  # noqa: E402

IMAGES = 16  # distinct pictures in the pool
HUGE_EVERY = 50  # one request in this many sends an image read at about 400 MB of pixel rows
FIRST = 100  # requests after which the first memory figure is taken
PAST_CONTEXT = 10**9  # max_tokens no context holds: refused once the turn is built


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="model directory (default: the tiny test model, built once)")
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--clients", type=int, default=4, help="requests in flight at once")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--timeout", type=int, default=600, help="seconds for the server to start")
    p.add_argument("--save", action="store_true", help="write bench/results/<date>_<backend>_..._soak.*")
    p.add_argument("--label", default="")
    return p.parse_args(argv)


def rss(pid: int) -> dict:
    """A process's resident memory now and at its peak, in bytes (Linux's /proc)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) * 1024
    return {"rss": fields["VmRSS"], "peak": fields["VmHWM"]}


class Server(serve.Server):
    """server.py on a free port (bench/serve.py's), with the soak's kinds of client."""

    def __init__(self, model: Path, dtype: str, log: Path, timeout: int):
        super().__init__("ours", model, dtype, log, timeout)

    def connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)

    def post(self, body: dict | bytes) -> tuple[int, bytes]:
        """A whole request and its whole answer: the status and the body (a stream's events)."""
        connection = self.connect()
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        connection.request("POST", "/v1/chat/completions", payload, {"Content-Type": "application/json"})
        response = connection.getresponse()
        data = response.read()
        connection.close()
        return response.status, data

    def drop_stream(self, body: dict, events: int) -> int:
        """A stream whose client reads a few events and goes away."""
        connection = self.connect()
        connection.request("POST", "/v1/chat/completions", json.dumps(body | {"stream": True}))
        response = connection.getresponse()
        for _ in range(2 * events):  # "data: ..." and a blank line each
            response.readline()
        connection.close()
        return response.status

    def abandon(self, body: dict, after: float) -> int:
        """A whole answer its client gives up on: the request sent, the connection closed unanswered."""
        connection = self.connect()
        connection.request("POST", "/v1/chat/completions", json.dumps(body))
        time.sleep(after)
        connection.close()
        return 0


def image_url(seed: int, width: int, height: int) -> str:
    buffer = io.BytesIO()
    noise_image(width, height, seed).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def text(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


def with_image(url: str, question: str) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]
    return [{"role": "user", "content": parts}]


class Soak:
    def __init__(self, server: Server):
        self.server = server
        self.pool = [image_url(seed, 64 + 32 * (seed % 7), 48 + 32 * (seed % 5)) for seed in range(IMAGES)]
        self.tiny = [image_url(1000 + seed, 16, 16) for seed in range(IMAGES)]
        self.kinds: dict[str, int] = {}
        self.wrong: list[str] = []
        self.lock = threading.Lock()

    def one(self, i: int) -> None:
        kind, expected, status = self.request(i)
        with self.lock:
            self.kinds[kind] = self.kinds.get(kind, 0) + 1
            if expected is not None and status != expected:
                self.wrong.append(f"request {i} ({kind}): HTTP {status}, expected {expected}")

    def request(self, i: int) -> tuple[str, int | None, int]:
        """The i-th request of the soak: its kind, the status it must get (None: not read), the status."""
        s, image = self.server, self.pool[i % IMAGES]
        greedy = {"temperature": 0, "max_tokens": 8}
        match i % 10:
            case 0:
                return "text", 200, s.post({"messages": text(f"Question {i}: why?"), **greedy})[0]
            case 1:
                body = {"messages": text(f"Question {i}: how?"), "stream": True, **greedy}
                return "text stream", 200, s.post(body)[0]
            case 2:
                return "image", 200, s.post({"messages": with_image(image, "What is it?"), **greedy})[0]
            case 3:
                body = {"messages": with_image(image, "Describe it."), "stream": True, **greedy}
                return "image stream", 200, s.post(body)[0]
            case 4:
                messages = with_image(image, "What is it?")
                status, data = s.post({"messages": messages, **greedy})
                if status != 200:
                    return "conversation", 200, status
                answer = json.loads(data)["choices"][0]["message"]["content"]
                messages += [{"role": "assistant", "content": answer}] + text("And then?")
                return "conversation", 200, s.post({"messages": messages, **greedy})[0]
            case 5:
                body = {"messages": text(f"Story {i}"), "temperature": 0, "max_tokens": 400}
                return "dropped stream", 200, s.drop_stream(body, 3)
            case 6:
                body = {"messages": with_image(image, f"Story {i}"), "temperature": 0, "max_tokens": 400}
                return "abandoned answer", None, s.abandon(body, 0.2)
            case 7:
                pixels = 16_776_192 if i % HUGE_EVERY == 7 else 1024 * 1024
                messages = with_image(self.tiny[i % IMAGES], "What?")
                body = {"messages": messages, "max_tokens": PAST_CONTEXT, "min_pixels": pixels}
                return "refused large image", 400, s.post(body)[0]
            case 8:
                bodies = [
                    {"messages": text("Hi"), "stop": ["a", "b", "c", "d", "e"]},
                    {"messages": text("Hi"), "stop": "x" * 2000},
                    {"messages": text("Hi"), "temperature": -1},
                    b"{not json",
                ]
                return "refused options", 400, s.post(bodies[i // 10 % len(bodies)])[0]
            case _:
                junk = "data:image/png;base64," + base64.b64encode(b"not a picture" * 100).decode()
                return "refused image", 400, s.post({"messages": with_image(junk, "What?")})[0]


def run(server: Server, args: argparse.Namespace) -> dict:
    soak = Soak(server)
    figures = {}
    started = time.perf_counter()
    figures["every_hundred"] = []  # resident memory after each FIRST requests: the curve between the two
    with ThreadPoolExecutor(args.clients) as pool:
        for start in range(0, args.requests, FIRST):
            list(pool.map(soak.one, range(start, min(start + FIRST, args.requests))))
            figures["every_hundred"].append(rss(server.process.pid)["rss"])
            if start == 0:
                figures["after_first"] = rss(server.process.pid)
    time.sleep(2)  # the last abandoned answers leave the engine (their next token sees the cancel)
    figures["at_end"] = rss(server.process.pid)
    figures["ratio"] = figures["at_end"]["rss"] / figures["after_first"]["rss"]
    figures["seconds"] = time.perf_counter() - started
    figures["kinds"], figures["wrong"] = soak.kinds, soak.wrong
    return figures


def render(output: dict) -> str:
    r = output["results"]
    mb = 10**6
    lines = [
        f"# Server soak: {output['checkpoint']} ({output['config']['dtype']}), {output['date']}",
        "",
        f"{output['machine'].get('cpu', output['machine']['platform'])}, {output['machine']['cpus']} cores; "
        f"{output['config']['requests']} requests from {output['config']['clients']} clients at once in "
        f"{r['seconds']:.0f} s; resident memory of the server process (/proc VmRSS, peak VmHWM).",
        "",
        "| when | resident | peak so far |",
        "|---|---:|---:|",
        f"| after the first {FIRST} requests | {r['after_first']['rss'] / mb:,.0f} MB | "
        f"{r['after_first']['peak'] / mb:,.0f} MB |",
        f"| at the end | {r['at_end']['rss'] / mb:,.0f} MB | {r['at_end']['peak'] / mb:,.0f} MB |",
        f"| end / after the first {FIRST} | {r['ratio']:.2f}x | |",
        "",
        f"Resident after every {FIRST} requests (MB): "
        + ", ".join(f"{b / mb:,.0f}" for b in r.get("every_hundred", [])),
        "",
        "Requests: " + ", ".join(f"{n} {kind}" for kind, n in sorted(r["kinds"].items())) + ".",
        f"Wrong statuses: {len(r['wrong'])}" + "".join(f"\n- {w}" for w in r["wrong"][:20]),
    ]
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    model = args.model or presets.checkpoint("tiny", None, None)
    log = Path(os.environ.get("TMPDIR", "/tmp")) / "mlx-qwen3vl-soak.log"
    server = Server(model, args.dtype, log, args.timeout)
    try:
        results = run(server, args)
    finally:
        server.stop()
    output = serve.output_of(model, args, results)
    report = render(output)
    print(report)
    if args.save:
        serve.save(output, report, "soak", args)
    return output


if __name__ == "__main__":
    main()
