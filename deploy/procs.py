"""The processes of a Flower federation started from Python: start, watch, stop.

Used by :mod:`deploy.cluster` (a SuperLink and SuperNodes with TLS) and by
:mod:`bench.flower_runs` (``flwr run . local`` and the simulation SuperLink it
leaves behind), so that both start a process with its output in a log file,
read a log's tail, find a process tree and stop it the same way.

Stopping is SIGTERM first, so that Flower's exit handlers run, then SIGKILL for
whatever is still alive after a timeout. ``psutil`` (a dependency of
``flwr[simulation]``) finds the descendants; it is imported where it is used.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

HOST = "127.0.0.1"

# The environment of every Flower process started here.
FLWR_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    # Else the SuperLink runs `uv sync` on the app's dependencies for every run.
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}


# ---------------------------------------------------------------- start


_S = TypeVar("_S", bound="StartStop")


class StartStop:
    """``with x:`` runs ``x.start()`` and, on the way out (errors too), ``x.stop()``."""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self: _S) -> _S:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def spawn(
    cmd: Sequence[str], log: IO[str], *, env: Mapping[str, str], cwd: Path
) -> subprocess.Popen:
    """Start ``cmd`` in its own session, its output going to ``log``.

    Parameters
    ----------
    cmd
        The command; written to ``log`` first as ``$ <cmd>``.
    log
        An open text file; the caller closes it (the process keeps its own handle).
    env, cwd
        The process's whole environment and working folder.

    Returns
    -------
    subprocess.Popen
        The process; its pid is its process group, so one ``killpg`` (see
        :func:`terminate`) reaches its helpers too.
    """
    return _start(
        cmd,
        log,
        env,
        cwd,
        stdout=log,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )


def start_copied(
    cmd: Sequence[str],
    log: IO[str],
    *,
    env: Mapping[str, str],
    cwd: Path,
    echo: bool = False,
    lines: list[str] | None = None,
    new_session: bool = False,
) -> tuple[subprocess.Popen, threading.Thread]:
    """Start ``cmd``; a thread copies its output line by line to ``log``.

    A thread reads the output (not ``communicate``) so that the caller's
    ``wait(timeout=...)`` still times out on a process that hangs silently.

    Parameters
    ----------
    cmd, log, env, cwd
        As for :func:`spawn`; ``log`` is flushed after every line, and closed
        by the caller after it joined the thread.
    echo
        Also print every line to stdout as it arrives.
    lines
        If given, every line is appended to it too (for parsing the output).
    new_session
        Start the process in its own session, to stop it with :func:`terminate`.

    Returns
    -------
    tuple[subprocess.Popen, threading.Thread]
        The process and the (started, daemon) thread that copies its output.
    """
    proc = _start(
        cmd,
        log,
        env,
        cwd,
        stdout=subprocess.PIPE,
        text=True,
        errors="replace",
        start_new_session=new_session,
    )

    def copy() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if lines is not None:
                lines.append(line)
            log.write(line)
            log.flush()
            if echo:
                sys.stdout.write(line)
                sys.stdout.flush()

    reader = threading.Thread(target=copy, daemon=True)
    reader.start()
    return proc, reader


def _start(
    cmd: Sequence[str], log: IO[str], env: Mapping[str, str], cwd: Path, **popen: Any
) -> subprocess.Popen:
    """Write ``$ <cmd>`` to ``log``, then start ``cmd`` with stderr into stdout."""
    log.write("$ " + shlex.join(cmd) + "\n")
    log.flush()
    return subprocess.Popen(
        cmd, env=dict(env), cwd=cwd, stderr=subprocess.STDOUT, **popen
    )


# ---------------------------------------------------------------- watch


def free_port(host: str = HOST) -> int:
    """A TCP port free on ``host`` right now (the OS picks it)."""
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def log_tail(path: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of the log at ``path``; ``""`` if it cannot be read."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def http_ok(
    url: str, *, verify: ssl.SSLContext | bool = True, timeout_s: float = 0.5
) -> bool:
    """Whether ``GET url`` answers with a 2xx status (False if nothing answers)."""
    import httpx  # a flwr dependency

    try:
        return httpx.get(url, verify=verify, timeout=timeout_s).is_success
    except httpx.HTTPError:
        return False


def port_open(host: str, port: int, timeout_s: float = 1.0) -> bool:
    """Whether a TCP connection to ``host:port`` succeeds."""
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError:
        return False
    return True


def check_running(name: str, proc: subprocess.Popen, log_path: Path) -> None:
    """Raise ``RuntimeError`` with the tail of ``log_path`` if ``proc`` has exited."""
    if proc.poll() is not None:
        raise RuntimeError(
            f"{name} exited with {proc.returncode}; {log_path}:\n{log_tail(log_path)}"
        )


def wait_until(ready: Callable[[], bool], timeout_s: float, interval_s: float) -> bool:
    """Call ``ready()`` every ``interval_s`` until it is true or ``timeout_s`` passed.

    Returns whether it became true. ``ready`` may raise to give up early (e.g.
    when the process it waits for has exited).
    """
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval_s)
    return True


def wait_health(
    proc: subprocess.Popen,
    name: str,
    url: str,
    cafile: Path,
    log_path: Path,
    timeout_s: float,
    also: Callable[[], bool] | None = None,
) -> None:
    """Until ``GET url`` (HTTPS, checked against ``cafile``) answers 2xx and
    ``also()`` holds; ``RuntimeError`` if ``proc`` exits, ``TimeoutError`` after
    ``timeout_s``."""
    ctx = ssl.create_default_context(cafile=str(cafile))

    def ready() -> bool:
        check_running(name, proc, log_path)
        return http_ok(url, verify=ctx, timeout_s=2) and (also is None or also())

    if not wait_until(ready, timeout_s, 0.5):
        raise TimeoutError(
            f"{name} did not answer on {url} within {timeout_s:.0f} s; see {log_path}"
        )


def refuse_alive(pidfile: Path, why: str) -> None:
    """Raise ``RuntimeError(why)`` if a process of ``pidfile`` (``{name: pid}``
    JSON, e.g. what ``--keep`` leaves running) is alive; remove a stale file."""
    if not pidfile.is_file():
        return
    alive = []
    for name, pid in json.loads(pidfile.read_text()).items():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        except PermissionError:
            pass  # alive, someone else's
        alive.append(f"{name} (pid {pid})")
    if alive:
        raise RuntimeError(f"{why}: {', '.join(alive)} still running")
    pidfile.unlink()


def find_processes(match: Callable[[list[str]], bool]) -> list[Any]:
    """Every process (``psutil.Process``) whose command line ``match`` accepts."""
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        if match(p.info.get("cmdline") or []):
            found.append(p)
    return found


def process_tree(pid: int) -> list[Any]:
    """The process ``pid`` and all its descendants (``psutil.Process``).

    Returns ``[]`` if the process is gone, or without psutil.
    """
    try:
        import psutil
    except ImportError:
        return []
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


# ---------------------------------------------------------------- stop


def _send(procs: Sequence[Any], action: str) -> None:
    """``p.terminate()`` or ``p.kill()`` on each ``psutil.Process``; gone ones skipped."""
    if not procs:
        return
    import psutil

    for p in procs:
        try:
            getattr(p, action)()
        except psutil.Error:
            pass


def _kill_left(procs: Sequence[Any], timeout_s: float) -> None:
    """Wait up to ``timeout_s`` for ``procs`` to end; SIGKILL the ones left."""
    if not procs:
        return
    import psutil

    _, alive = psutil.wait_procs(procs, timeout=timeout_s)
    _send(alive, "kill")
    psutil.wait_procs(alive, timeout=timeout_s)


def stop_processes(procs: Sequence[Any], timeout_s: float) -> None:
    """SIGTERM every process (``psutil.Process``); SIGKILL those alive after ``timeout_s``.

    Processes that are gone already are skipped. For processes found by
    :func:`find_processes` or :func:`process_tree`, not started here.
    """
    _send(procs, "terminate")
    _kill_left(procs, timeout_s)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def terminate(procs: Sequence[subprocess.Popen], timeout_s: float) -> None:
    """SIGTERM each process group and its descendants; SIGKILL what is left.

    Each process was started in its own session (:func:`spawn`, or
    :func:`start_copied` with ``new_session``): its pid is its process group,
    so one ``killpg`` reaches its helpers too. A descendant may run in a session
    of its own (Flower's SuperExec does), hence the explicit descendant list.

    Parameters
    ----------
    procs
        Processes started here; ones that have ended already are waited for only.
    timeout_s
        How long all of them together get to exit after SIGTERM.
    """
    descendants = [
        child for p in procs if p.poll() is None for child in process_tree(p.pid)[1:]
    ]
    for p in procs:
        if p.poll() is None:
            _signal_group(p.pid, signal.SIGTERM)
    _send(descendants, "terminate")
    deadline = time.monotonic() + timeout_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(p.pid, signal.SIGKILL)
            p.wait(timeout=10)
    _kill_left(descendants, max(0.1, deadline - time.monotonic()))


# ---------------------------------------------------------------- a group


@dataclass
class Proc:
    """A process started here: its name (and log file name) and its log."""

    name: str
    popen: subprocess.Popen
    log: IO[str]


class Processes:
    """Named processes started here, each logging to ``<logs_dir>/<name>.log``.

    ``len()`` is how many are held; :meth:`stop` stops them all (those named in
    ``last`` after the others), :meth:`release` lets them run on unwatched.
    """

    def __init__(self, logs_dir: Path, cwd: Path) -> None:
        self.logs_dir = logs_dir
        self.cwd = cwd
        self.items: list[Proc] = []

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[Proc]:
        return iter(list(self.items))

    def start(self, name: str, cmd: Sequence[str], env: Mapping[str, str]) -> Proc:
        """:func:`spawn` ``cmd`` with its output in ``<name>.log`` (truncated)."""
        log = open(self.logs_dir / f"{name}.log", "w")  # noqa: SIM115 - closed in stop()
        proc = Proc(name, spawn(cmd, log, env=env, cwd=self.cwd), log)
        self.items.append(proc)
        return proc

    def get(self, name: str) -> Proc | None:
        return next((p for p in self.items if p.name == name), None)

    def forget(self, proc: Proc) -> None:
        """Close ``proc``'s log and stop holding it (it has ended, or is left)."""
        proc.log.close()
        self.items.remove(proc)

    def stop(self, timeout_s: float, last: Sequence[str] = ()) -> None:
        """:func:`terminate` every process, those named in ``last`` after the rest."""
        terminate([p.popen for p in self.items if p.name not in last], timeout_s)
        terminate([p.popen for p in self.items if p.name in last], timeout_s)
        for p in list(self.items):
            self.forget(p)

    def release(self) -> list[Proc]:
        """Stop holding every process (they keep running); returns them."""
        left = list(self.items)
        for p in left:
            self.forget(p)  # the processes keep their own handles
        return left
