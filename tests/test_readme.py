"""Every example in README.md runs as written, so the README cannot drift from the code.

- ```python blocks run with the real package in a folder holding the media they name (photo.jpg,
  clip.mp4, ...). `load()` without arguments, the default hub model (no downloads here), gives the tiny
  test checkpoint instead, and every answer says a scripted text (`scripted.say`): the random model's
  answers are noise, and a scripted one exercises the branches an example has (a tool call, a box).
- ```bash blocks: each command line of chat.py, server.py and convert.py is parsed by that script's own
  argument parser (no model runs); install and test commands must be the project's known ones. The
  server's command line is then started for real (on the tiny checkpoint, on a free port), and the
  curl and OpenAI-client examples run against it.
- ```json blocks: the long-context config is read by the package's config.
- Every option the README names exists in a script's `--help`, and the README stays under 20,000 bytes.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import re
import shlex
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from functools import cache
from pathlib import Path

import pytest
from media import picture, write_video
from scripted import say
from serving import wait_until_healthy

from mlx_qwen3vl.config import ModelConfig

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
TEXT = README.read_text()
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
SCRIPTS = ("chat.py", "server.py", "convert.py")
# The install, test and system commands the README may show (CI runs the test one: .ci/run).
KNOWN_COMMANDS = {
    "python -m pip install -e .",
    "python -m pip install -e '.[test]'",
    "python -m pip install -e '.[server]'",
    "python -m pytest",
    "python -m pytest -m 'not slow'",
    "python -m venv .venv",
    ". .venv/bin/activate",
    "sudo apt-get install libopenblas0-pthread",
}
MEDIA_FILE = re.compile(r"""["']([\w./-]+\.(?:jpe?g|png|mp4))["']""")
# A folder of photos an example searches: `Path("photos").glob("*.jpg")`.
PHOTO_FOLDER = re.compile(r"""Path\(["'](\w+)["']\)\.glob\(["']\*\.jpg["']\)""")
PHOTOS = 4
SERVER_URL = "http://127.0.0.1:8080"
# What the model says in each kind of example (keyed by what the example does), and how the example's
# namespace or output shows that it did its work with that answer.
TOOL_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Bern"}}\n</tool_call>'
BOXES = '```json\n[{"bbox_2d": [100, 200, 600, 900], "label": "cat"}]\n```'
PLAIN = "A small red square."


def examples(language: str) -> list[tuple[int, str]]:
    """(line in README.md, code) of each fenced block in `language`."""
    return [
        (TEXT.count("\n", 0, m.start(2)), m.group(2)) for m in FENCE.finditer(TEXT) if m.group(1) == language
    ]


def bash_commands() -> list[list[str]]:
    """The argument lists of every command in the README's bash blocks."""
    return [argv for _, block in examples("bash") for line in command_lines(block) for argv in commands(line)]


def uses_server(code: str) -> bool:
    return SERVER_URL.removeprefix("http://") in code


def block_id(example: tuple[int, str]) -> str:
    return f"line-{example[0] + 1}"


def command_lines(block: str) -> list[str]:
    """The block's commands, a line each (a backslash continues a line; so does an open quote)."""
    lines, pending = [], ""
    for line in block.replace("\\\n", " ").splitlines():
        pending = f"{pending}\n{line}" if pending else line
        try:
            shlex.split(pending, comments=True)
        except ValueError:  # a quoted string goes on
            continue
        lines.append(pending)
        pending = ""
    assert not pending, f"unclosed quote in README: {pending!r}"
    return [line for line in lines if shlex.split(line, comments=True)]


def commands(line: str) -> list[list[str]]:
    """The argument lists of a command line's commands, split at `&&`, `|` and `;`."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    result = [[]]
    for word in lexer:
        if word in ("&&", "|", ";"):
            result.append([])
        else:
            result[-1].append(word)
    return result


@cache
def script(name: str):
    """chat.py, server.py or convert.py as a module (its `main` is not run)."""
    spec = importlib.util.spec_from_file_location(f"readme_{Path(name).stem}", ROOT / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse(argv: list[str]) -> None:
    """The script's own argument parser accepts these arguments, or the test fails with its message."""
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors):
        try:
            script(argv[1]).parse_args(argv[2:])
        except SystemExit:
            pytest.fail(f"README: `{shlex.join(argv)}` is refused: {errors.getvalue().strip()}")


@cache
def help_text(name: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        script(name).parse_args(["--help"])
    return out.getvalue()


def pyproject_extras() -> set[str]:
    text = (ROOT / "pyproject.toml").read_text()
    table = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r"^(\w+) = \[", table, re.MULTILINE))


@cache
def launcher_help() -> str:
    """`mlx.launch --help`: the README starts the scripts across Macs with MLX's launcher."""
    launcher = Path(sys.executable).parent / "mlx.launch"
    return subprocess.run([str(launcher), "--help"], capture_output=True, text=True, check=True).stdout


def check_command(argv: list[str], first: bool) -> None:
    if argv[:1] == ["mlx.launch"] and "--" in argv:  # its options, then a command the README may show
        for flag in (word for word in argv[1 : argv.index("--")] if word.startswith("-")):
            assert flag in launcher_help(), f"README: mlx.launch has no option {flag}"
        check_command(argv[argv.index("--") + 1 :], first)
    elif argv[:1] == ["python"] and argv[1:2] and argv[1] in SCRIPTS:
        parse(argv)
    elif argv[:1] == ["curl"]:
        curl_request(argv)  # a well-formed request to the server; it is sent in the server test
    elif argv[:1] == ["echo"]:
        assert first, f"README: `{shlex.join(argv)}` is only a pipe's source"
    else:
        assert shlex.join(argv) in KNOWN_COMMANDS, f"README: `{shlex.join(argv)}` is not a known command"
        for extra in re.findall(r"\.\[(\w+)\]", shlex.join(argv)):
            assert extra in pyproject_extras(), f"README: pip extra [{extra}] is not in pyproject.toml"


def curl_request(argv: list[str], port: int = 8080) -> urllib.request.Request:
    """The request a README curl line sends (to the server on `port`)."""
    url, headers, data, words = None, {}, None, iter(argv[1:])
    for word in words:
        if word == "-H":
            name, value = next(words).split(":", 1)
            headers[name.strip()] = value.strip()
        elif word == "-d":
            data = next(words)
        elif word.startswith("http"):
            url = word
        else:
            pytest.fail(f"README: curl option {word!r} is not understood by this test")
    assert url and url.startswith(SERVER_URL + "/"), f"README: curl to {url!r}, not the server's address"
    body = None if data is None else json.dumps(json.loads(data)).encode()
    return urllib.request.Request(url.replace(":8080", f":{port}"), data=body, headers=headers)


def make_media(code: str, folder: Path) -> list[str]:
    """The image and video files an example names, made in `folder`."""
    names = sorted(set(MEDIA_FILE.findall(code)))
    for name in names:
        if name.endswith(".mp4"):
            write_video(folder / name, frames=8, fps=4.0)
        else:
            picture(160, 120, seed=0).save(folder / name)
    for name in PHOTO_FOLDER.findall(code):
        (folder / name).mkdir()
        for k in range(PHOTOS):
            picture(96, 64, seed=k).save(folder / name / f"{k}.jpg")
    return names


def answer_for(code: str) -> str:
    if "tools=" in code:
        return TOOL_CALL
    if "grounding" in code:
        return BOXES
    return PLAIN


def run(line: int, code: str) -> tuple[dict, str]:
    """The example's code run as a module would be, with tracebacks pointing at README.md's lines."""
    namespace, out = {"__name__": "__readme__"}, io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile("\n" * line + code, str(README), "exec"), namespace)
    return namespace, out.getvalue()


def did_its_work(code: str, namespace: dict, output: str) -> None:
    """What the example is for happened with the scripted answer."""
    if "tools=" in code:
        roles = [m["role"] for m in namespace["messages"]]
        assert roles == ["user", "assistant", "tool"], f"the tool call was not answered: {roles}"
    elif "grounding" in code:
        assert [d.label for d in namespace["found"]] == ["cat"]
    elif "embed(" in code:  # the three best photos, best first
        lines = output.splitlines()
        scores = [float(line.split()[0]) for line in lines]
        assert len(lines) == 3 and scores == sorted(scores, reverse=True), output
    else:
        assert PLAIN in output, f"the answer was not printed: {output!r}"


@pytest.fixture
def readme_folder(tmp_path, monkeypatch, tiny_f32, tiny_checkpoint):
    """A working folder for the examples; `load()` of the default model gives the tiny checkpoint, and
    of an embedding model the tiny checkpoint as one."""
    import mlx_qwen3vl

    real_load = mlx_qwen3vl.load

    def load(*args, **kwargs):
        if args and "Embedding" in str(args[0]):
            return real_load(tiny_checkpoint, dtype="float32", task="embed")
        if args or kwargs:  # a path the README names would not exist here
            return real_load(*args, **kwargs)
        return tiny_f32

    monkeypatch.setattr(mlx_qwen3vl, "load", load)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_readme_is_short_and_shows_the_command_ci_runs():
    assert len(README.read_bytes()) <= 20_000, "README.md is over 20,000 bytes: measurements go to bench/"
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if "pytest" in line]
    assert ci and all(line.strip() in TEXT for line in ci), f"README.md does not show .ci/run's {ci}"


def test_every_block_is_an_example_this_file_checks():
    languages = [m.group(1) for m in FENCE.finditer(TEXT)]
    assert languages and set(languages) <= {"python", "bash", "json"}, languages
    assert TEXT.count("```") == 2 * len(languages), "an unmatched code fence"


@pytest.mark.parametrize("example", examples("bash"), ids=block_id)
def test_command_lines_are_accepted(example):
    for line in command_lines(example[1]):
        for i, argv in enumerate(commands(line)):
            check_command(argv, first=i == 0)


def test_every_option_the_readme_names_exists():
    helps = " ".join(help_text(name) for name in SCRIPTS) + launcher_help()
    for flag in sorted(set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", TEXT))):
        assert re.search(rf"(?<![\w-]){flag}(?![\w-])", helps), f"README names {flag}, which no script has"


@pytest.mark.parametrize("example", [e for e in examples("python") if not uses_server(e[1])], ids=block_id)
def test_python_example_runs(example, readme_folder, tiny_f32, monkeypatch):
    line, code = example
    make_media(code, readme_folder)
    say(monkeypatch, tiny_f32[1].tokenizer, answer_for(code))
    namespace, output = run(line, code)
    did_its_work(code, namespace, output)
    for name in MEDIA_FILE.findall(code):  # read or written by the example
        assert (readme_folder / name).exists(), name


def test_the_long_context_config_is_read_as_the_readme_says():
    ((_, block),) = examples("json")
    settings = json.loads("{" + block + "}")
    config = json.loads((ROOT / "tests" / "data" / "qwen3-vl-4b-instruct" / "config.json").read_text())
    config["text_config"].update(settings)
    text = ModelConfig.from_dict(config).text_config
    rope = settings["rope_scaling"]
    assert text.yarn is not None
    assert text.yarn.factor == rope["factor"]
    # "the larger of max_position_embeddings and factor x original_max_position_embeddings"
    larger = max(
        settings["max_position_embeddings"], rope["factor"] * rope["original_max_position_embeddings"]
    )
    assert text.context_length == larger


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# server.py as the README starts it, with every answer scripted (scripted.py) in the server's process.
SERVE = """
import json, sys
import mlx_qwen3vl
import pytest
sys.path.insert(0, "tests")
from scripted import script
script(pytest.MonkeyPatch(), json.loads(sys.argv[1]))
sys.argv = sys.argv[2:]
import runpy
runpy.run_path("server.py", run_name="__main__")
"""


def server_command(checkpoint: Path, port: int) -> list[str]:
    """The README's server command line, on the test checkpoint and `port`."""
    (argv,) = [argv for argv in bash_commands() if argv[:2] == ["python", "server.py"]]
    argv = argv[1:]
    if "--model" in argv:
        argv[argv.index("--model") + 1] = str(checkpoint)
    else:
        argv += ["--model", str(checkpoint)]
    return [*argv, "--port", str(port)]


@pytest.fixture
def readme_server(tiny_checkpoint, tiny_f32, tmp_path):
    port = free_port()
    tokens = tiny_f32[1].tokenizer.encode(PLAIN)
    log = (tmp_path / "server.log").open("w")
    argv = server_command(tiny_checkpoint, port)
    process = subprocess.Popen(
        [sys.executable, "-c", SERVE, json.dumps(tokens), *argv], cwd=ROOT, stdout=log, stderr=log
    )
    try:
        # Imports and loading take seconds; a hang must still fail.
        wait_until_healthy(process, port, 180, (tmp_path / "server.log").read_text)
        yield port
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def test_the_server_examples_run_against_the_readme_server(readme_server, readme_folder):
    curls = [argv for argv in bash_commands() if argv[0] == "curl"]
    clients = [e for e in examples("python") if uses_server(e[1])]
    assert curls and clients, "the README's server examples were not found"
    for argv in curls:
        try:
            with urllib.request.urlopen(curl_request(argv, readme_server), timeout=120) as response:
                answer = json.load(response)
        except urllib.error.HTTPError as e:
            pytest.fail(f"README: `{shlex.join(argv)}` was answered {e.code}: {e.read().decode()}")
        assert answer["choices"][0]["message"]["content"] == PLAIN
    for line, code in clients:
        make_media(code, readme_folder)
        _, output = run(line, code.replace(SERVER_URL, f"http://127.0.0.1:{readme_server}"))
        assert PLAIN in output, f"the streamed answer was not printed: {output!r}"
