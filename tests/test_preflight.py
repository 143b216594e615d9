"""Serve-time errors name their cause in one line: checks before Ray starts (exit 2, in seconds),
the same checks under Ray's own `serve run`, and, with a real Ray, a replica that fails to start,
a local Ray that dies during the start, and Ctrl-C during the start."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from deployments.app import build_app
from deployments.checks import SettingsError, check_port_free
from deployments.settings import AppSettings
from sinkcache.models.spec import ModelSpecError, check_model_spec
from sinkserve.serving import (
    SLOW_START_NOTE_AFTER_S,
    _Signals,
    client_address,
    new_notes,
    ready_line,
    startup_failure,
)
from tests.service import free_port, run_sinkserve

REPO = Path(__file__).resolve().parent.parent


def _one_line_error(done: subprocess.CompletedProcess, says: str) -> None:
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("sinkserve: error: ") and says in lines[0], lines[0]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--model", "/models/nope"], "model '/models/nope' does not exist; use default, tiny"),
        (["--model", "random:huge"], "unknown preset 'huge'; presets: llama3-8b, smollm2-135m"),
        (["--window", "0"], "window must be >= 1, got 0"),
        (["--slots", "-1"], "slots must be >= 1, got -1"),
        (["--window", "0", "--slots", "-1"], "window must be >= 1, got 0; slots must be >= 1"),
        (["--metrics-export-port", "70000"], "metrics_export_port must be in 1..65535"),
    ],
)
def test_serve_refuses_bad_settings_in_one_line_before_ray(args: list[str], says: str) -> None:
    started = time.monotonic()
    done = run_sinkserve("serve", *args)
    assert done.returncode == 2
    _one_line_error(done, says)
    assert done.stdout == ""
    assert time.monotonic() - started < 20  # no Ray: a start takes longer than this


def test_serve_refuses_a_taken_port_in_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_sinkserve("serve", "--model", "tiny", "--port", str(port))
    assert done.returncode == 2
    # No --host and no API keys: the gateway listens on loopback, which a wildcard listener blocks.
    _one_line_error(done, f"port {port} on 127.0.0.1 is in use")


def test_eval_ppl_refuses_bad_settings_in_one_line() -> None:
    for args, says in [
        (["--window", "0"], "window must be >= 1, got 0"),
        (["--model", "/models/nope"], "does not exist"),
        (["--mode", "fast"], "unknown mode 'fast'"),
    ]:
        done = run_sinkserve("eval-ppl", *args)
        assert done.returncode == 2
        _one_line_error(done, says)


def test_build_app_refuses_what_cannot_work() -> None:
    with pytest.raises(SettingsError, match="window must be >= 1, got 0"):
        build_app({"window": "0"})
    with pytest.raises(ValueError, match="unknown setting"):  # a ValueError for Python callers
        build_app({"windw": "10"})


def test_serve_run_says_the_reason_in_one_line() -> None:
    """Ray's own CLI prints the builder's SettingsError as `Error: ...` and exits 2."""
    done = subprocess.run(
        ["serve", "run", "deployments.app:build_app", "window=0", "--app-dir", str(REPO)],
        capture_output=True, text=True, timeout=120, cwd=REPO,
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "Error: window must be >= 1, got 0" in done.stderr
    assert "Traceback" not in done.stderr


def test_model_specs(tmp_path: Path) -> None:
    for fine in ("default", "tiny", "random:llama3-8b"):
        check_model_spec(fine)
    check_model_spec("/not/on/this/node", files=False)  # a cluster's nodes may have it

    hf = tmp_path / "hf"
    hf.mkdir()
    with pytest.raises(ModelSpecError, match=r"directory without config\.json"):
        check_model_spec(str(hf))
    (hf / "model.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelSpecError, match=r"holds model\.gguf: name the file"):
        check_model_spec(str(hf))
    (hf / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ModelSpecError, match="is a GPT2LMHeadModel, which sinkserve does not run"):
        check_model_spec(str(hf))
    (hf / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    check_model_spec(str(hf))
    check_model_spec(str(hf / "model.gguf"))
    (tmp_path / "weights.gguf").write_bytes(b"PK\x03\x04")
    with pytest.raises(ModelSpecError, match="no GGUF header"):
        check_model_spec(str(tmp_path / "weights.gguf"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelSpecError, match=r"not a \.gguf file"):
        check_model_spec(str(tmp_path / "weights.bin"))


def test_a_port_in_time_wait_is_free() -> None:
    """The check binds as gRPC does (SO_REUSEADDR): a port just closed is usable."""
    port = free_port()
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", port))
        server.listen()
        client = socket.create_connection(("127.0.0.1", port))
        conn, _ = server.accept()
        conn.close()  # the server side closes first: its port enters TIME_WAIT
        client.close()
    check_port_free("127.0.0.1", port, "port")


def test_startup_failure_is_the_replicas_own_last_line() -> None:
    message = (
        "The deployment failed to start 1 times in a row. This may be due to a problem with its "
        "constructor or initial health check failing. See controller logs for details. Error:\n"
        'Traceback (most recent call last):\n  File "x.py", line 74, in launch\n'
        "    raise EngineStoppedError(...)\n"
        "sinkcache.errors.EngineStoppedError: the engine process could not start: "
        "FileNotFoundError: model '/m' does not exist\n"
    )
    app = SimpleNamespace(
        status="DEPLOYING",
        message="",
        deployments={
            "Gateway": SimpleNamespace(status="HEALTHY", message=""),
            "SessionReplica": SimpleNamespace(status="UPDATING", message=message),
        },
    )
    assert startup_failure(app) == (
        "SessionReplica did not start: the engine process could not start: "
        "FileNotFoundError: model '/m' does not exist"
    )
    waiting = (
        "Deployment 'SessionReplica' has 1 replicas that have taken more than 30s to be scheduled."
    )
    app.deployments["SessionReplica"] = SimpleNamespace(status="UPDATING", message=waiting)
    assert startup_failure(app) is None  # a note, printed once, not a failure


def test_serves_slow_start_note_waits_until_a_start_is_really_slow() -> None:
    """Serve notes every replica past 30 s of initialisation: a first start on 2 cores, every
    time. It is shown once the start has taken SLOW_START_NOTE_AFTER_S; other notes at once."""
    slow = (
        "Deployment 'SessionReplica' in application 'sinkserve' has 1 replicas that have taken "
        "more than 30s to initialize. This may be caused by a slow __init__ or reconfigure method."
    )
    waiting = "Deployment 'Gateway' has 1 replicas that have taken more than 30s to be scheduled."
    app = SimpleNamespace(
        deployments={
            "SessionReplica": SimpleNamespace(message=slow),
            "Gateway": SimpleNamespace(message=waiting),
        }
    )
    noted: set[str] = set()
    assert new_notes(app, noted, elapsed_s=45.0) == [f"sinkserve: note: Gateway: {waiting}"]
    assert new_notes(app, noted, elapsed_s=60.0) == []  # each once
    late = new_notes(app, noted, elapsed_s=SLOW_START_NOTE_AFTER_S + 1)
    assert late == [f"sinkserve: note: SessionReplica: {slow}"]


def test_a_signal_during_the_start_is_kept_even_if_its_interrupt_is_swallowed() -> None:
    """Ray's start can catch the KeyboardInterrupt a Ctrl-C raises (a full run saw a start
    interrupted 3 s in print ready and serve on): the signal is recorded, and the start's next
    check raises it again."""
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    signals = _Signals()
    try:
        signals.install()
        try:  # what a library that swallows the interrupt does
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs at the next bytecode; the sleep is cut short
        except KeyboardInterrupt:
            pass
        with pytest.raises(KeyboardInterrupt):
            signals.check()
        # Once ready, a signal asks for the clean stop instead.
        ready = _Signals()
        ready.ready = True
        ready._handle(signal.SIGTERM, None)
        assert ready.stop.is_set()
        ready.check()  # nothing recorded as an interrupted start
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def test_the_ready_line_names_the_address_clients_default_to() -> None:
    """`localhost`, as the README and every client's --target default say, for a loopback or
    wildcard listener; details listed, so another endpoint is one more of them."""
    settings = AppSettings.from_args({"host": "127.0.0.1", "port": 50051})
    assert client_address(settings) == "localhost:50051"
    line = ready_line(client_address(settings), ["model default", "1 replica(s)"])
    assert line == "ready localhost:50051 (model default, 1 replica(s))"


# -- with a real Ray ----------------------------------------------------------------------------


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "sinkserve.cli", "serve", "--host", "127.0.0.1",
         "--port", str(free_port()), "--slots", "2", "--window", "60", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        start_new_session=True,
    )  # fmt: skip


def _finish(serve: subprocess.Popen, timeout: float) -> tuple[str, str]:
    try:
        return serve.communicate(timeout=timeout)
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGKILL)


def _progress_or_note(line: str) -> bool:
    """A line of the start's progress ("sinkserve: starting Ray", ...) or a note of Serve's."""
    return line.startswith("sinkserve: ") and not line.startswith("sinkserve: error: ")


def _raylet_of(serve_pid: int, timeout: float) -> int:
    """The raylet a `sinkserve serve` process started (its child), once it runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = subprocess.run(
            ["pgrep", "-P", str(serve_pid), "raylet"], capture_output=True, text=True
        ).stdout.split()
        if found:
            return int(found[0])
        time.sleep(0.2)
    raise AssertionError("no raylet started")


@pytest.mark.slow
def test_a_replica_that_fails_to_start_ends_the_command_with_its_reason(tmp_path: Path) -> None:
    fake = tmp_path / "broken.gguf"
    fake.write_bytes(b"GGUF" + b"\0" * 16)  # passes the preflight, fails to load
    serve = _start("--model", str(fake))
    out, err = _finish(serve, timeout=300)
    assert serve.returncode == 1, err
    assert "ready" not in out
    # The reason in one line, last; before it only the start's progress lines and Serve's
    # notes, one line each, which a busy box can print (a replica slow to initialise).
    *notes, line = [line for line in err.splitlines() if line.strip()]
    assert line.startswith("sinkserve: error: SessionReplica did not start: the engine process"), (
        err
    )
    assert all(_progress_or_note(note) for note in notes), err


# What Ray's core worker (C++) says as it ends a driver whose raylet died while the driver was
# connecting to it, before our watchdog can speak: registering, or fetching the system config
# (both seen in full runs on the 2-core box).
RAY_DRIVER_DEATH_LINES = (
    "Failed to register worker to Raylet",
    "Failed to get the system config from raylet because it is dead",
)


@pytest.mark.slow
def test_a_local_ray_that_dies_during_the_start_ends_the_command() -> None:
    serve = _start("--model", "tiny")
    raylet = _raylet_of(serve.pid, timeout=120)
    time.sleep(2)  # as it happened: Ray stopped from outside 2 s into a start
    os.kill(raylet, signal.SIGKILL)
    killed = time.monotonic()
    out, err = _finish(serve, timeout=120)
    assert time.monotonic() - killed < 30
    assert serve.returncode != 0 and "ready" not in out
    lines = [line for line in err.splitlines() if line.strip() and not _progress_or_note(line)]
    if len(lines) == 1 and any(said in lines[0] for said in RAY_DRIVER_DEATH_LINES):
        # Ray died while this process was connecting to it as its driver: Ray's core worker
        # (C++) ends the process at once with its own one line and QuickExit (_Exit(1)), before
        # the watchdog can speak (the 2 s above land in that window on a busy box).
        assert serve.returncode == 1, err
        return
    assert lines and all(line.startswith("sinkserve: error: ") for line in lines), err
    assert "the local Ray cluster stopped: its raylet exited" in lines[0], err


@pytest.mark.slow
def test_ctrl_c_during_the_start_stops_it() -> None:
    serve = _start("--model", "tiny")
    _raylet_of(serve.pid, timeout=120)
    time.sleep(3)  # inside ray.init or the deploy
    serve.send_signal(signal.SIGINT)
    interrupted = time.monotonic()
    out, err = _finish(serve, timeout=120)
    assert time.monotonic() - interrupted < 60
    assert serve.returncode == 130, err
    assert "ready" not in out
    assert "Traceback" not in err
