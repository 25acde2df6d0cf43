"""README.md stays true: every setting is documented, the test command is the one CI runs, and every shell example
runs as written (or is listed here with the reason it cannot run on our machines)."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import pty
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from shared.settings import Settings, env_name, settings_table
from tests.external_tools import venv_tool
from tests.processes import free_port

ROOT = Path(__file__).resolve().parent.parent


def test_every_setting_is_in_the_readme_with_its_default() -> None:
    readme = (ROOT / "README.md").read_text()
    for spec in dataclasses.fields(Settings):
        assert f"`{env_name(spec.name)}`" in readme, f"{env_name(spec.name)} is not documented in README.md"
    # The Configuration table is exactly what the settings declare (defaults and meanings included). To
    # regenerate it: python -c "from shared.settings import settings_table; print(settings_table())"
    assert settings_table() in readme, "README's Configuration table differs from shared.settings.settings_table()"


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "./run-tests" in readme
    assert "exec ./run-tests" in ci
    assert "pricegate demo" in readme


# --- every shell example, as written ---------------------------------------------------------------------------------

# Each ```sh block of README.md, by its first line: the test that runs it as written, or why it cannot run here.
RUN_BY = {
    "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/pricegate demo": "the quick start",
    ".venv/bin/pricegate watch btcusdt@trade ethusdt@ticker btcusdt@bookTicker": "the quick start",
    ". .venv/bin/activate": "the quick start",
    "pip install uv   # or pip-tools: pip-compile --generate-hashes -o requirements.lock pyproject.toml": "the lock",
    ".venv/bin/kubectl kustomize k8s/overlays/prod | .venv/bin/kubernetes-validate --strict -k 1.33.0 -": "kustomize",
}
NOT_RUN = {
    "./run-tests": "it is this test suite (.ci/run runs exactly it)",
    "export PRICEGATE_REDIS_URL=redis://127.0.0.1:6379/0": "scaled mode wants a PostgreSQL role and database named "
    "pricegate, the live exchange (--source binance) and a recording FILE of the reader's; tests/test_scaled.py, "
    "test_workers.py and test_db.py run these roles against the test Redis and database",
    "pricegate record --streams btcusdt@trade,btcusdt@bookTicker --out btc.jsonl --duration 60": "needs the live "
    "Binance exchange (tests/test_recorder.py records from the fake exchange)",
    "docker build -t pricegate:0.1.0 .": "no Docker engine on our machines (tests/test_packaging.py checks the image's "
    "install steps)",
    "docker compose up --build -d": "no Docker engine on our machines (tests/test_compose.py validates compose.yaml)",
    "kubectl create namespace pricegate": "needs a Kubernetes cluster (tests/test_k8s.py validates the manifests)",
    "export PRICEGATE_DATABASE_URL=postgresql://pricegate@db.internal/pricegate": "a placeholder database host and "
    "<KEY>; tests/test_keys_cli.py runs these commands against the test database",
    ".venv-locust/bin/locust -f loadtests/locustfile.py --headless -u 20 -r 10 -t 10s \\": "tests/test_locust.py "
    "runs it against a demo of its own",
}
DEMO_PORT = 8000  # what the examples name
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


def sh_blocks() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    return [block.splitlines() for block in re.findall(r"^```sh\n(.*?)^```", text, re.DOTALL | re.MULTILINE)]


def block(first_line: str) -> list[str]:
    (found,) = [lines for lines in sh_blocks() if lines[0] == first_line]
    return found


def test_every_shell_example_is_run_or_listed_with_the_reason() -> None:
    unlisted = [lines[0] for lines in sh_blocks() if lines[0] not in RUN_BY and lines[0] not in NOT_RUN]
    assert unlisted == [], "README shell examples neither run by tests/test_readme.py nor listed in NOT_RUN"


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def at_port(line: str, port: int) -> str:
    """The line as written when the demo has the examples' port; else only the port changed (``pricegate watch``
    names the local demo's by default, so it is given the other one explicitly)."""
    if port == DEMO_PORT:
        return line
    line = line.replace(f"127.0.0.1:{DEMO_PORT}", f"127.0.0.1:{port}")
    if re.search(r"\bpricegate watch\b", line) and "--url" not in line:
        line = re.sub(r"(pricegate watch [^|#]*?)(\s*(\||#|$))", rf"\1 --url ws://127.0.0.1:{port}\2", line, count=1)
    return line


def fresh_copy(destination: Path) -> Path:
    """The project's files as they are in the work tree, tracked or new (not ignored): what a fresh clone holds."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout
    for name in listed.decode().split("\0"):
        source = ROOT / name
        if name and source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    return destination


def clean_env(**extra: str) -> dict[str, str]:
    """The user's environment without this test run's virtualenv."""
    env = {key: value for key, value in os.environ.items() if key not in ("VIRTUAL_ENV", "PYTHONPATH")}
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(part for part in env.get("PATH", "").split(os.pathsep) if part != venv_bin)
    return {**env, **extra}


class Shell:
    """One line of a README block in bash (after ``prefix``, e.g. the block's ``. .venv/bin/activate``), in its own
    process group so Ctrl-C reaches whatever it started."""

    def __init__(self, line: str, cwd: Path, env: dict[str, str], *, prefix: str = "", stdin: bool = False) -> None:
        self.line = line
        self.process = subprocess.Popen(
            ["bash", "-c", f"{prefix}\n{line}" if prefix else line],
            cwd=cwd,
            env=env,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.output = b""
        assert self.process.stdout is not None
        os.set_blocking(self.process.stdout.fileno(), False)

    def read(self) -> str:
        assert self.process.stdout is not None
        chunk = None if self.process.stdout.closed else self.process.stdout.read()
        if chunk:
            self.output += chunk
        return self.output.decode(errors="replace")

    def wait_for(self, pattern: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.read()):
            assert self.process.poll() is None, f"{self.line!r} exited {self.process.returncode}:\n{self.read()}"
            assert time.monotonic() < deadline, f"{self.line!r}: no {pattern!r} in {timeout} s:\n{self.read()}"
            time.sleep(0.1)
        return self.read()

    def finish(self, timeout: float = 30) -> tuple[int, str]:
        deadline = time.monotonic() + timeout
        while self.process.poll() is None:  # read meanwhile: a full pipe would stop the process
            assert time.monotonic() < deadline, f"{self.line!r} still running after {timeout} s:\n{self.read()}"
            self.read()
            time.sleep(0.05)
        time.sleep(0.05)
        output = self.read()
        self.close()
        return self.process.returncode, output

    def close(self) -> None:
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()

    def interrupt(self) -> int:
        """Ctrl-C, as a user stops it."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
        try:
            return self.process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            return self.process.wait()
        finally:
            self.read()
            self.close()


def watch_in_a_terminal(line: str, cwd: Path, env: dict[str, str]) -> str:
    """Run a ``pricegate watch`` line under a pseudo-terminal until every stream it names has a row with a price."""
    streams = re.findall(r"\b[a-z0-9]+@\w+", line)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 130, 0, 0))
    process = subprocess.Popen(
        ["bash", "-c", line], cwd=cwd, env={**env, "TERM": "xterm"}, stdin=slave, stdout=slave, stderr=slave
    )
    os.close(slave)
    os.set_blocking(master, False)
    screen = ""
    try:
        deadline = time.monotonic() + 30
        while not all(re.search(rf"{re.escape(s)}\s*│\s*[\d.]+", ANSI.sub("", screen)) for s in streams):
            assert time.monotonic() < deadline and process.poll() is None, ANSI.sub("", screen)
            with contextlib.suppress(BlockingIOError, OSError):
                screen += os.read(master, 65536).decode(errors="replace")
            time.sleep(0.1)
        process.send_signal(signal.SIGINT)
        assert process.wait(10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(master)
    return ANSI.sub("", screen)


def run_examples_block(lines: list[str], cwd: Path, env: dict[str, str], port: int) -> None:
    """The quick start's examples, each line as written after the block's first line (the venv's activation)."""
    prefix, instruction = lines[0], None
    for line in lines[1:]:
        comment = line.startswith("#")
        if comment:
            typed = re.search(r"type\s+(\{.*\})", line)
            instruction = typed.group(1) if typed else None
            continue
        command = at_port(line, port)
        if command.startswith("pricegate watch") and "--json" in command:
            code, output = Shell(command, cwd, env, prefix=prefix).finish()
            lines = output.splitlines()  # stdout's frames, and stderr's "pricegate watch: connected to ..."
            frames = [json.loads(text) for text in lines if text.startswith("{")]
            assert all(text.startswith(("{", "pricegate watch: ")) for text in lines), output
            assert code == 0 and len(frames) == 3 and all(f["stream"] == "btcusdt@kline_1m" for f in frames), output
        elif command.startswith("python -m websockets"):
            shell = Shell(command, cwd, env, prefix=prefix, stdin=True)  # a terminal's input stays open
            if instruction is not None:
                assert shell.process.stdin is not None
                shell.process.stdin.write(instruction.encode() + b"\n")
                shell.process.stdin.flush()
                shell.wait_for(r'< \{"result":null,"id":1\}', 20)
                shell.wait_for(r'< \{"e":"24hrTicker","E":\d+,"s":"SOLUSDT"', 20)
            else:
                shell.wait_for(r'< \{"(stream|e)":', 20)
            shell.interrupt()
            assert "No module named" not in shell.read() and "Traceback" not in shell.read()
        elif command.startswith("curl"):
            done = subprocess.run(
                ["bash", "-c", f"{prefix}\n{command}"], cwd=cwd, env=env, capture_output=True, timeout=60
            )
            body = json.loads(done.stdout)  # stdout alone: curl's progress meter goes to stderr
            assert done.returncode == 0 and not (isinstance(body, dict) and "code" in body), done.stdout
        else:
            raise AssertionError(f"README example line not known to tests/test_readme.py: {line!r}")
        instruction = None


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_the_quick_start_as_written(tmp_path: Path) -> None:
    """A fresh copy, a fresh virtualenv, pip install, the demo; then watch in a terminal, and every example."""
    checkout = fresh_copy(tmp_path / "pricegate")
    port = DEMO_PORT if port_is_free(DEMO_PORT) else free_port()
    env = clean_env(PIP_DISABLE_PIP_VERSION_CHECK="1")
    (install,) = block(next(first for first, test in RUN_BY.items() if test == "the quick start"))
    demo = Shell(install, checkout, {**env, "PRICEGATE_PORT": str(port)} if port != DEMO_PORT else env)
    try:
        demo.wait_for(rf"pricegate is serving on http://127\.0\.0\.1:{port}", timeout=600)
        (watch,) = block(".venv/bin/pricegate watch btcusdt@trade ethusdt@ticker btcusdt@bookTicker")
        screen = watch_in_a_terminal(at_port(watch, port), checkout, env)
        assert "msg/s" in screen and "Traceback" not in screen
        run_examples_block(block(". .venv/bin/activate"), checkout, env, port)
    finally:
        assert demo.interrupt() == 0, demo.read()[-3000:]


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_the_lock_regenerates_as_written(tmp_path: Path) -> None:
    """README's two commands that regenerate requirements.lock, in a fresh copy's activated virtualenv, give the
    committed lock: it is up to date with pyproject.toml."""
    checkout = fresh_copy(tmp_path / "pricegate")
    env = clean_env(PIP_DISABLE_PIP_VERSION_CHECK="1")
    assert Shell("python3 -m venv .venv", checkout, env).finish()[0] == 0
    (first, compile_line) = block(
        "pip install uv   # or pip-tools: pip-compile --generate-hashes -o requirements.lock pyproject.toml"
    )
    for line in (first, compile_line):
        code, output = Shell(line, checkout, env, prefix=". .venv/bin/activate").finish(timeout=500)
        assert code == 0, output
    assert (checkout / "requirements.lock").read_text() == (ROOT / "requirements.lock").read_text()


def test_the_kustomize_validation_as_written() -> None:
    (line,) = block(
        ".venv/bin/kubectl kustomize k8s/overlays/prod | .venv/bin/kubernetes-validate --strict -k 1.33.0 -"
    )
    venv_tool(".venv", "kubectl")  # the dev extra; ./run-tests installs it (missing: fails under CI=true)
    code, output = Shell(line, ROOT, dict(os.environ)).finish(timeout=120)
    assert code == 0, output
