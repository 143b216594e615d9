"""`sinkserve serve` after its preflight: start (or join) Ray, deploy, watch the start, print
`ready`, serve until a signal, stop.

The start is watched rather than waited on, so that it ends with one line whatever goes wrong:
- a replica whose constructor fails: its own reason, at the first failure (Serve would retry three
  times and then say only "Failed to update the deployments");
- the local Ray cluster dying (raylet or GCS gone): at once, instead of calls that hang;
- Ctrl-C or SIGTERM at any point: the start stops and what was started is taken down; a second
  signal stops without waiting. A signal is also recorded, not only raised: Ray's start can swallow
  the KeyboardInterrupt (a full test run saw a start interrupted 3 s in print `ready` and serve on),
  so the start checks the record at each step and before `ready`.
It says what it is doing on the way (Ray, the replicas loading the model and warming up, the
gateway), with the seconds each step took, so a start of a minute is not a silent one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from deployments.settings import AppSettings

READY_TIMEOUT_S = 900.0  # a first start on a slow machine compiles and loads for minutes
# Serve notes a replica that takes more than 30 s to initialise; a first start on 2 cores does
# that every time (about 40 s), so the note is shown only once a start is really slow.
SLOW_START_NOTE_AFTER_S = 120.0
_SLOW_INIT_NOTE = "taken more than 30s to initialize"
POLL_S = 0.5
EXIT_INTERRUPTED = 130


class StartFailed(RuntimeError):
    """The service could not start; the message is one line."""


def run_service(settings: AppSettings, address: str | None, verbose: bool) -> int:
    """Start the service and serve until a signal; an exit code."""
    import ray

    local = address is None
    _quiet_ray(verbose)
    signals = _Signals()
    # Watching from before ray.init: the cluster can die while ray.init waits for it.
    watchdog = _LocalRayWatchdog() if local else None
    signals.watchdog = watchdog
    started = time.monotonic()
    _progress("starting Ray" + (" (a local cluster)" if local else f" (joining {address})"))
    signals.install()  # before ray.init: a Ctrl-C its start swallows is still recorded
    try:
        ray.init(
            address=address,
            include_dashboard=False,
            namespace="sinkserve",
            log_to_driver=verbose,
            logging_level=logging.INFO if verbose else logging.WARNING,
            **(_local_cluster_options(settings) if local else {}),
        )
        signals.check()
    except KeyboardInterrupt:
        if watchdog is not None:
            watchdog.stopping = True
        _error("interrupted while Ray was starting")
        _force_stop_local_ray()
        # A core worker interrupted half-way through its start can crash the interpreter's
        # teardown (SIGSEGV seen in CI): nothing is left to clean up, so leave at once.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED)
    except Exception as error:  # Ray could not start or could not be reached
        if watchdog is not None:
            watchdog.stopping = True
        _error(f"Ray did not start: {_last_line(str(error))}")
        _force_stop_local_ray()
        return 1
    signals.install()  # again after ray.init, which installs a SIGTERM handler of its own
    try:
        signals.check()
        _progress(f"Ray started ({time.monotonic() - started:.0f} s)")
        _deploy(settings)
        _progress(_deploying(settings))
        address = wait_until_ready(settings, interrupted=signals.check)
        signals.check()
        signals.ready = True
        print(ready_line(address, _ready_details(settings, local)), flush=True)
        signals.stop.wait()
        print("shutting down", flush=True)
        return 0
    except KeyboardInterrupt:
        print("interrupted: stopping (Ctrl-C again to stop at once)", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except StartFailed as error:
        _error(str(error) + ("" if verbose else " (-v shows Ray's and the replicas' logs)"))
        return 1
    finally:
        if watchdog is not None:
            watchdog.stopping = True
        _stop(settings, local, graceful=signals.ready)


def _local_cluster_options(settings: AppSettings) -> dict[str, Any]:
    options: dict[str, Any] = {"num_cpus": max(4, os.cpu_count() or 1)}
    if settings.metrics_export_port:
        options["_metrics_export_port"] = settings.metrics_export_port
    return options


def _deploy(settings: AppSettings) -> None:
    from ray import serve

    from deployments.app import build_app

    serve.start(proxy_location="Disabled")
    # Not blocking: wait_until_ready watches the start and can name a replica's failure.
    serve._run(build_app(settings), name=settings.application, route_prefix=None, _blocking=False)


def _deploying(settings: AppSettings) -> str:
    engine = settings.engine
    return (
        f"starting {settings.replicas} replica(s): each loads model {engine.model} and warms up "
        "(on a GPU: compiles its kernels, captures its CUDA graphs) before it serves"
    )


def client_address(settings: AppSettings) -> str:
    """Where clients on this machine reach the service: `localhost` for a loopback or wildcard
    listener (the address the clients' --target defaults to), else the host it listens on."""
    host = settings.listen_host
    loopback = host in ("0.0.0.0", "::", "127.0.0.1", "::1", "localhost")
    return f"{'localhost' if loopback else host}:{settings.port}"


def ready_line(address: str, details: list[str]) -> str:
    """`ready ADDRESS (detail, detail, ...)`: the line scripts wait for. More endpoints (a
    metrics URL, another port) are more details."""
    return f"ready {address} ({', '.join(details)})"


def wait_until_ready(
    settings: AppSettings,
    timeout_s: float = READY_TIMEOUT_S,
    status: Callable[[], Any] | None = None,
    interrupted: Callable[[], None] = lambda: None,
) -> str:
    """Poll until the gateway serves with every replica behind it; the client address.

    Raises StartFailed with a replica's own reason as soon as Serve reports a failed start, and
    whatever `interrupted()` raises (it is called at every poll). Serve's other notes (e.g.
    replicas waiting for resources) are printed once each; its slow-initialisation note only
    once the start has taken SLOW_START_NOTE_AFTER_S.
    """
    from ray import serve

    status = status or serve.status
    noted: set[str] = set()
    started = time.monotonic()
    deadline = started + timeout_s
    replicas_up = False
    while time.monotonic() < deadline:
        interrupted()
        app = status().applications.get(settings.application)
        if app is not None:
            failure = startup_failure(app)
            if failure:
                raise StartFailed(failure)
            for line in new_notes(app, noted, time.monotonic() - started):
                print(line, file=sys.stderr)
            if not replicas_up and _replicas_running(app):
                replicas_up = True
                _progress(f"replicas up ({time.monotonic() - started:.0f} s); starting the gateway")
        if app is not None and _routed_replicas(settings) >= settings.replicas:
            return client_address(settings)
        time.sleep(POLL_S)
    raise StartFailed(f"not serving {settings.replicas} replica(s) within {timeout_s:.0f} s")


def new_notes(app: Any, noted: set[str], elapsed_s: float) -> list[str]:
    """Serve's notes on the deployments not printed yet (each added to `noted`), as lines. Its
    note on a replica slow to initialise waits until the start has taken SLOW_START_NOTE_AFTER_S:
    a first start on a small machine takes longer than Serve's 30 s every time."""
    lines = []
    for name, deployment in app.deployments.items():
        note = deployment.message.strip()
        if not note or note in noted:
            continue
        if _SLOW_INIT_NOTE in note and elapsed_s < SLOW_START_NOTE_AFTER_S:
            continue  # expected on a first start, not a fault; shown if it lasts
        noted.add(note)
        lines.append(f"sinkserve: note: {name}: {_one_line(note)}")
    return lines


def _replicas_running(app: Any) -> bool:
    deployment = app.deployments.get("SessionReplica")
    return deployment is not None and str(deployment.status).endswith("HEALTHY")


def _routed_replicas(settings: AppSettings) -> int:
    """Replicas a gateway routes to, asked through Serve: this needs none of a client's
    credentials (keys, TLS), which the service may require."""
    from ray import serve

    try:
        gateway = serve.get_deployment_handle("Gateway", app_name=settings.application)
        return gateway.backends.remote().result(timeout_s=2.0)
    except Exception:  # not deployed or not ready yet
        return 0


def startup_failure(app: Any) -> str | None:
    """One line if Serve reports that the app or one of its deployments failed to start."""
    if str(app.status).endswith("DEPLOY_FAILED") and not app.deployments:
        return f"the application did not deploy: {_last_line(app.message)}"
    for name, deployment in app.deployments.items():
        message = deployment.message or ""
        failed = str(deployment.status).endswith(("DEPLOY_FAILED", "UNHEALTHY")) or (
            "failed to start" in message or "Traceback" in message
        )
        if failed and message.strip():
            return f"{name} did not start: {_last_line(message)}"
        if failed:
            return f"{name} did not start ({deployment.status})"
    return None


_EXCEPTION_PREFIX = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Failure): ")


def _last_line(message: str) -> str:
    """A traceback's last line without its exception class (the reason itself)."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if not lines:
        return "no reason given"
    return _EXCEPTION_PREFIX.sub("", lines[-1], count=1)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _ready_details(settings: AppSettings, local: bool) -> list[str]:
    details = [f"model {settings.engine.model}", f"{settings.replicas} replica(s)"]
    if settings.openai_port:  # the OpenAI-compatible HTTP door, on the gateway's address
        host = settings.listen_host
        host = "localhost" if host in ("0.0.0.0", "::") else host
        scheme = "https" if settings.tls_cert else "http"
        details.append(f"OpenAI API {scheme}://{host}:{settings.openai_port}/v1")
    port = _metrics_port() if local else None
    if port:
        details.append(f"metrics http://localhost:{port}/metrics")
    return details


def _metrics_port() -> int | None:
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    return getattr(node, "metrics_export_port", None) if node is not None else None


def _stop(settings: AppSettings, local: bool, graceful: bool) -> None:
    """Take the application down (its replicas drain), then the local cluster if it is ours.

    Deleting the app rather than shutting Serve down leaves a joined cluster's other apps alone
    and avoids the controller's killed-while-stopping error on a local one. A local start that
    did not get to `ready` is not drained: stopping the cluster ends it at once."""
    import ray
    from ray import serve

    try:
        if graceful or not local:
            serve.delete(settings.application)
    except Exception as error:  # Ray is going away anyway; say why, then stop it
        _error(f"stopping the application: {_last_line(str(error))}")
    finally:
        ray.shutdown()


class _Signals:
    """SIGINT/SIGTERM: during the start, the first one interrupts it (KeyboardInterrupt); once
    ready, it asks for a clean stop. A second one stops at once."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.interrupted = threading.Event()  # a signal during the start, even if swallowed
        self.ready = False
        self.watchdog: _LocalRayWatchdog | None = None
        self._count = 0

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: Any) -> None:
        self._count += 1
        if self._count > 1:
            if self.watchdog is not None:
                self.watchdog.stopping = True
            _error("stopped without waiting")
            _force_stop_local_ray()
            os._exit(EXIT_INTERRUPTED)
        if self.ready:
            self.stop.set()
        else:
            self.interrupted.set()
            raise KeyboardInterrupt

    def check(self) -> None:
        """Raise KeyboardInterrupt if a signal came during the start (whoever caught it)."""
        if self.interrupted.is_set():
            raise KeyboardInterrupt


class _LocalRayWatchdog:
    """Ends the command when the local Ray cluster dies under it (its raylet or GCS, children of
    this process, exit), with one line: calls into a dead cluster would otherwise hang for
    minutes. It watches the processes themselves, so it works while ray.init still waits."""

    CRITICAL = ("raylet", "gcs_server")

    def __init__(self) -> None:
        import psutil

        self._me = psutil.Process()
        self._watched: dict[int, tuple[str, Any]] = {}
        self.stopping = False
        threading.Thread(target=self._watch, name="sinkserve-ray-watchdog", daemon=True).start()

    def _watch(self) -> None:
        import psutil

        while not self.stopping:
            with contextlib.suppress(psutil.Error):
                for child in self._me.children():
                    if child.pid not in self._watched:
                        with contextlib.suppress(psutil.Error):
                            if child.name() in self.CRITICAL:
                                self._watched[child.pid] = (child.name(), child)
            for pid, (name, process) in list(self._watched.items()):
                try:
                    dead = process.status() == psutil.STATUS_ZOMBIE
                except psutil.NoSuchProcess:
                    dead = True
                if dead and not self.stopping:
                    _error(f"the local Ray cluster stopped: its {name} exited ({_reap(pid)})")
                    _force_stop_local_ray()
                    os._exit(1)
            time.sleep(POLL_S)


def _reap(pid: int) -> str:
    """How a dead child ended (reaping it, unless Ray already has)."""
    try:
        reaped, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:  # Ray reaped it first
        return "see Ray's logs"
    if reaped == 0:
        return "see Ray's logs"
    code = os.waitstatus_to_exitcode(status)
    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"


def _force_stop_local_ray() -> None:
    """Kill the local cluster this process started: Ray's own record of it when there is one,
    and every process this one started (ray.init may not have recorded them yet)."""
    with contextlib.suppress(Exception):
        import ray

        node = getattr(ray._private.worker, "_global_node", None)
        if node is not None and node.head:
            node.kill_all_processes(check_alive=False, allow_graceful=False)
    with contextlib.suppress(Exception):
        import psutil

        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                child.kill()


def _quiet_ray(verbose: bool) -> None:
    """Ray's notes that say nothing to a user of this command: the token-authentication notice
    of a local cluster, Serve's "Started Serve" and "Connecting to existing Serve app", and the
    raylet's 25-line death notice (the watchdog says it in one line). `-v` keeps them all."""
    if verbose:
        return
    import ray._private.worker as ray_worker
    import ray.serve  # noqa: F401  (configures Serve's logger when first imported)

    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
        logging.ERROR
    )
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    # The driver's error listener prints what the cluster pushes through this function.
    print_to_stdstream = getattr(ray_worker, "print_to_stdstream", None)
    if print_to_stdstream is not None:

        def without_raylet_death(data: dict, ignore_prefix: bool) -> None:
            lines = data.get("lines") or [""]
            if data.get("pid") == "raylet" and str(lines[0]).startswith("Raylet is terminated"):
                return
            print_to_stdstream(data, ignore_prefix)

        ray_worker.print_to_stdstream = without_raylet_death


def _error(message: str) -> None:
    print(f"sinkserve: error: {message}", file=sys.stderr, flush=True)


def _progress(message: str) -> None:
    print(f"sinkserve: {message}", file=sys.stderr, flush=True)
