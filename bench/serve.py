"""The server's figures, measured as a client sees them: `server.py` (and mlx-vlm's server beside it) on
a bench checkpoint, requests over HTTP from threads, each figure the median of `--runs`.

    python bench/serve.py --preset tiny --compare mlx-vlm --save

- throughput: N streams at once (N = 1, 4, 8 by default), each its own text prompt and
  `--tokens` greedy tokens; generated tokens of all streams / wall time from the first request sent to
  the last answer done. The ratio to one stream is what batched decoding buys.
- conversation: the first request about a 1024x768 image (a data URL, as clients send it) and the
  second, which resends the conversation with the answer and a follow-up; time to the first streamed
  text of each. The ratio is what the prompt cache buys. Every run uses a new image, so each first
  request is cold.
- schema: one stream's decode rate (tokens after the first / time from the first text to the last)
  without and with a JSON schema (`response_format`), greedy.
- pause: one stream runs; after its first texts, another request sends a 1024x1024 image (a data URL);
  the longest gap between two texts of the running stream from then until the image request's first
  text, beside the stream's median gap before it. What a running stream suffers while a heavy request is
  admitted.

`--before DIR` runs a second checkout's `server.py` (another commit of this package) as the system
"before", on the same checkpoint in the same run.

Each server runs in its own process, one after the other; the client is the standard library's
http.client, so the figures hold no client library's overhead.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import http.client
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import presets  # noqa: E402
from inputs import noise_image  # noqa: E402
from measure import machine  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {"title": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}}},
    "required": ["title", "tags"],
}
# Distinct openings, so that no stream's prompt is a prefix of another's in the prompt cache.
TOPICS = ["rivers", "mountains", "harbours", "forests", "deserts", "glaciers", "islands", "valleys"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", choices=sorted(presets.PRESETS))
    p.add_argument("--layers", type=int)
    p.add_argument("--vision-blocks", type=int)
    p.add_argument("--model", type=Path, help="serve this model directory instead of a preset's checkpoint")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--compare", default="", help="peers: mlx-vlm")
    p.add_argument("--streams", default="1,4,8", help="concurrent streams of the throughput figure")
    p.add_argument("--tokens", type=int, default=128, help="tokens per answer (throughput, schema)")
    p.add_argument("--chat-tokens", type=int, default=16, help="tokens of the conversation's first answer")
    p.add_argument("--pause-tokens", type=int, default=400, help="tokens of the running stream (pause)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--figures", default="throughput,conversation,schema,pause")
    p.add_argument("--before", type=Path, help="a checkout of another commit, run as the system 'before'")
    p.add_argument("--timeout", type=int, default=600, help="seconds for a server to start")
    p.add_argument("--json", type=Path, help="write the full results here")
    p.add_argument("--save", action="store_true", help="write bench/results/<date>_<backend>_..._serve.*")
    p.add_argument("--label", default="")
    p.add_argument("--cache", type=Path, default=presets.CACHE_ROOT)
    return p.parse_args(argv)


# ---- the servers ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(system: str, model: Path, port: int, dtype: str, root: Path = ROOT) -> list[str]:
    if system in ("ours", "before"):
        return [sys.executable, str(root / "server.py"), "--model", str(model), "--port", str(port)] + [
            "--dtype",
            dtype,
        ]
    if system == "mlx-vlm":
        # mlx-vlm keeps the checkpoint's dtype (bfloat16 for the bench checkpoints).
        return [sys.executable, "-m", "mlx_vlm.server", "--model", str(model), "--port", str(port)] + [
            "--host",
            "127.0.0.1",
        ]
    raise SystemExit(f"unknown system {system}")


class Server:
    """One server process on a free port, its output in a log file; started and waited for."""

    def __init__(self, system: str, model: Path, dtype: str, log: Path, timeout: int, root: Path = ROOT):
        self.system, self.model, self.port = system, model, free_port()
        self.log = log
        with open(log, "w") as out:
            self.process = subprocess.Popen(
                server_command(system, model, self.port, dtype, root),
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=root,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{system} server exited: {log.read_text()[-2000:]}")
            try:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                connection.request("GET", "/health")
                if connection.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{system} server did not answer /health within {timeout} s")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()

    def chat(self, messages: list[dict], max_tokens: int, times: list | None = None, **extra) -> dict:
        """One streamed request: when its first text came, when its last did, the text and the usage;
        `times`, if given, gets the arrival time of each text as it comes."""
        body = {
            "model": str(self.model),
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
            **extra,
        }
        payload = json.dumps(body)  # the client's own work, before the clock starts
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        sent = time.perf_counter()
        connection.request("POST", "/v1/chat/completions", payload, {"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            raise RuntimeError(f"{self.system}: HTTP {response.status}: {response.read()[:500]!r}")
        first = last = None
        text, usage = [], None
        times = [] if times is None else times
        for line in response:
            line = line.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            data = json.loads(line[6:])
            if "error" in data:
                raise RuntimeError(f"{self.system}: {data['error']}")
            usage = data.get("usage") or usage
            for choice in data.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    last = time.perf_counter()
                    first = first or last
                    text.append(piece)
                    times.append(last)
        done = time.perf_counter()
        connection.close()
        tokens = (usage or {}).get("completion_tokens")
        return {
            "sent": sent,
            "first": first,
            "last": last,
            "done": done,
            "text": "".join(text),
            "tokens": tokens,
            "times": times,
        }


# ---- the figures -------------------------------------------------------------------------------------


def text_question(i: int, run: int) -> list[dict]:
    topic = TOPICS[i % len(TOPICS)]
    return [{"role": "user", "content": f"Run {run}, stream {i}: write a long story about {topic}."}]


def throughput(server: Server, streams: int, tokens: int, run: int) -> dict:
    """Generated tokens of `streams` simultaneous requests per second of wall time."""
    answers: list[dict | Exception] = [None] * streams

    def ask(i: int) -> None:
        try:
            answers[i] = server.chat(text_question(i, run), tokens)
        except Exception as e:  # reported by the main thread
            answers[i] = e

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(streams)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for answer in answers:
        if isinstance(answer, Exception):
            raise answer
    wall = max(a["done"] for a in answers) - start
    generated = sum(a["tokens"] for a in answers)
    return {"tok_s": generated / wall, "tokens": generated, "wall_s": wall}


def image_url(seed: int, size: tuple[int, int] = (1024, 768)) -> str:
    buffer = io.BytesIO()
    noise_image(*size, seed).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def conversation(server: Server, chat_tokens: int, run: int) -> dict:
    """Time to first text of a conversation's first request (a new image) and of its second."""
    question = [
        {"type": "image_url", "image_url": {"url": image_url(1000 + run)}},
        {"type": "text", "text": "Describe this picture in detail."},
    ]
    messages = [{"role": "user", "content": question}]
    first = server.chat(messages, chat_tokens)
    messages += [
        {"role": "assistant", "content": first["text"]},
        {"role": "user", "content": "What colours stand out most?"},
    ]
    second = server.chat(messages, chat_tokens)
    turn1, turn2 = first["first"] - first["sent"], second["first"] - second["sent"]
    return {"turn1_ttft_s": turn1, "turn2_ttft_s": turn2, "speedup": turn1 / turn2}


def decode_rate(answer: dict) -> float:
    return (answer["tokens"] - 1) / (answer["last"] - answer["first"])


def schema(server: Server, tokens: int, run: int) -> dict:
    """One stream's decode rate without and with a JSON schema."""
    plain = server.chat(text_question(0, run), tokens)
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "story", "schema": SCHEMA, "strict": True},
    }
    constrained = server.chat(text_question(1, run), tokens, response_format=response_format)
    if constrained["tokens"] < tokens:  # the answer ended by itself: it must be the JSON asked for
        json.loads(constrained["text"])
    return {
        "plain_tok_s": decode_rate(plain),
        "schema_tok_s": decode_rate(constrained),
        "schema_tokens": constrained["tokens"],
        "ratio": decode_rate(constrained) / decode_rate(plain),
    }


def pause(server: Server, tokens: int, run: int) -> dict:
    """The running stream's longest gap between two texts while a 1024x1024 image request is admitted,
    and its median gap before."""
    running: dict = {}
    times: list[float] = []
    thread = threading.Thread(
        target=lambda: running.update(server.chat(text_question(0, run), tokens, times=times))
    )
    image = image_url(2000 + run, (1024, 1024))
    thread.start()
    while len(times) < 5 and thread.is_alive():  # the stream is running: its first texts came
        time.sleep(0.01)
    question = [
        {"type": "image_url", "image_url": {"url": image}},
        {"type": "text", "text": "Describe this picture."},
    ]
    heavy = server.chat([{"role": "user", "content": question}], 4)
    thread.join()
    gaps = list(zip(times, times[1:], strict=False))
    before = [b - a for a, b in gaps if b < heavy["sent"]]
    during = [b - a for a, b in gaps if b > heavy["sent"] and a < heavy["first"]]
    if len(before) < 2 or not during:
        raise RuntimeError(f"the stream ended before the image was admitted: raise --tokens ({tokens})")
    longest = max(during)
    return {
        "longest_pause_s": longest,
        "median_gap_s": statistics.median(before),
        "admit_s": heavy["first"] - heavy["sent"],
    }


def median_of(samples: list[dict]) -> dict:
    return {k: statistics.median(s[k] for s in samples) for k in samples[0]} | {"samples": samples}


def measure(server: Server, args: argparse.Namespace) -> dict:
    """Every figure asked for; one a server cannot do is reported as its error and the others go on."""
    server.chat(text_question(0, -1), 8)  # warm up: the first request compiles and allocates
    figures = {}
    for n in [int(s) for s in args.streams.split(",")]:
        figures[f"throughput_{n}"] = lambda r, n=n: throughput(server, n, args.tokens, r)
    figures["conversation"] = lambda r: conversation(server, args.chat_tokens, r)
    figures["schema"] = lambda r: schema(server, args.tokens, r)
    figures["pause"] = lambda r: pause(server, args.pause_tokens, r)
    out: dict = {}
    for name, figure in figures.items():
        if name.split("_")[0] not in args.figures.split(","):
            continue
        try:
            out[name] = median_of([figure(r) for r in range(args.runs)])
        except Exception as e:
            out[name] = {"error": str(e)}
        shown = {k: v for k, v in out[name].items() if k != "samples"}
        print(f"[serve] {server.system} {name}: {shown}", flush=True)
    return out


# ---- report ------------------------------------------------------------------------------------------


def render(output: dict) -> str:
    systems = list(output["results"])
    lines = [
        f"# Server bench: {output['checkpoint']} ({output['config']['dtype']}), {output['date']}",
        "",
        f"{output['machine'].get('cpu', output['machine']['platform'])}, {output['machine']['cpus']} cores; "
        f"{output['config']['tokens']} tokens per answer, median of {output['config']['runs']} runs; "
        "greedy; over HTTP from threads (http.client). mlx-vlm keeps the checkpoint's dtype (bfloat16).",
        "",
        "| figure | " + " | ".join(systems) + " | target |",
        "|---|" + "---:|" * len(systems) + "---|",
    ]

    def row(label: str, get, target: str = "") -> None:
        cells = []
        for system in systems:
            try:
                cells.append(get(output["results"][system]))
            except (KeyError, TypeError, ZeroDivisionError):
                cells.append("-")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {target} |")

    for n in [int(s) for s in output["config"]["streams"].split(",")]:
        row(
            f"{n} stream{'s' * (n > 1)}: tok/s (all streams)",
            lambda r, n=n: f"{r[f'throughput_{n}']['tok_s']:.1f}",
        )
        if n > 1:
            row(
                f"{n} streams / 1 stream",
                lambda r, n=n: f"{r[f'throughput_{n}']['tok_s'] / r['throughput_1']['tok_s']:.2f}x",
                ">= 2.5x at 4" if n == 4 else "",
            )
    row("image conversation: request 1 TTFT", lambda r: f"{r['conversation']['turn1_ttft_s'] * 1e3:.0f} ms")
    row("image conversation: request 2 TTFT", lambda r: f"{r['conversation']['turn2_ttft_s'] * 1e3:.0f} ms")
    row("request 1 / request 2", lambda r: f"{r['conversation']['speedup']:.1f}x", ">= 10x")
    row("decode tok/s, no schema", lambda r: f"{r['schema']['plain_tok_s']:.1f}")
    row("decode tok/s, JSON schema", lambda r: f"{r['schema']['schema_tok_s']:.1f}")
    row("with schema / without", lambda r: f"{r['schema']['ratio']:.2f}")
    row("running stream: median gap", lambda r: f"{r['pause']['median_gap_s'] * 1e3:.0f} ms")
    row(
        "running stream: longest gap while a 1024x1024 image is admitted",
        lambda r: f"{r['pause']['longest_pause_s'] * 1e3:.0f} ms",
    )
    row("image request: time to first text", lambda r: f"{r['pause']['admit_s'] * 1e3:.0f} ms")
    failed = [
        f"- {system}, {name}: {figure['error']}"
        for system, figures in output["results"].items()
        for name, figure in figures.items()
        if "error" in figure
    ]
    if failed:
        lines += ["", "Figures a server could not give:", *failed]
    return "\n".join(lines)


def output_of(model: Path, args: argparse.Namespace, results: dict) -> dict:
    """A run's record: when, where, on what, with which arguments, and its results."""
    from measure import backend

    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(),
        "backend": backend()[0],
        "checkpoint": model.name,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "results": results,
    }


def save(output: dict, text: str, kind: str, args: argparse.Namespace) -> None:
    """bench/results/<date>_<backend>_<checkpoint>_<dtype>_<kind>[_label].json and .md."""
    stem = f"{output['date'][:10]}_{output['backend']}_{output['checkpoint']}_{args.dtype}_{kind}"
    stem += f"_{args.label}" if args.label else ""
    (HERE / "results" / f"{stem}.json").write_text(json.dumps(output, indent=1, default=str))
    (HERE / "results" / f"{stem}.md").write_text(text + "\n")
    print(f"[{kind}] saved bench/results/{stem}.json and .md")


def main(argv=None) -> dict:
    args = parse_args(argv)
    model = args.model or presets.checkpoint(args.preset, args.layers, args.vision_blocks, root=args.cache)
    systems = ["ours"] + ["before"] * bool(args.before) + [s for s in args.compare.split(",") if s]
    results = {}
    logs = Path(os.environ.get("TMPDIR", "/tmp"))
    for system in systems:
        root = args.before.resolve() if system == "before" else ROOT
        log = logs / f"mlx-qwen3vl-serve-{system}.log"
        server = Server(system, model, args.dtype, log, args.timeout, root)
        try:
            results[system] = measure(server, args)
        finally:
            server.stop()
    output = output_of(model, args, results)
    text = render(output)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(output, indent=1, default=str))
    if args.save:
        save(output, text, "serve", args)
    return output


if __name__ == "__main__":
    main()
