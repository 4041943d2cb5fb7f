"""Model servers for the tests: ``charrnn serve`` in a subprocess on a free loopback port.

A thread reads the server's log (stderr) as it comes, so a chatty server never
blocks on a full pipe and a test can wait for a log line (a version loaded, a
call received, a batch run) instead of sleeping.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import json
import time
import urllib.error
import urllib.request

SERVER_START_TIMEOUT = 180.0


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports that nobody listens on now (all bound at once, then released).

    Args:
        n: how many ports.

    Returns:
        The port numbers.

    Example:

    >>> rest_port, = free_ports(1)
    """
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class ServerProcess:
    """``charrnn serve ARGS --port 0 --host 127.0.0.1``, started and ready to serve.

    Args:
        args: ``charrnn serve`` flags (``--model_name``, ``--model_base_path``, ...).
        cwd: the server's working folder.
        debug: log at debug level (each call received, each batch run).

    Example:

    >>> server = ServerProcess(["--model_name", "m", "--model_base_path", "saved_models/m"])  # doctest: +SKIP
    >>> server.port, server.stop()                                                           # doctest: +SKIP
    (40123, 0)
    """

    def __init__(self, args: list[str], cwd: str | os.PathLike | None = None, debug: bool = False):
        cmd = [
            sys.executable,
            "-m",
            "keras_charrnn.cli",
            "serve",
            "--port",
            "0",
            "--host",
            "127.0.0.1",
            *(["--log_level", "debug"] if debug else []),
            *map(str, args),
        ]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd)
        self.log: list[str] = []
        self._log_changed = threading.Condition()
        self._stdout: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read_log, daemon=True).start()
        threading.Thread(target=self._read_stdout, daemon=True).start()
        self.port = self._wait_for_port()

    def _read_log(self) -> None:
        for line in self.proc.stderr:
            with self._log_changed:
                self.log.append(line.rstrip("\n"))
                self._log_changed.notify_all()

    def _read_stdout(self) -> None:
        for line in self.proc.stdout:
            self._stdout.put(line)
        self._stdout.put("")  # end of output

    def _wait_for_port(self) -> int:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while time.monotonic() < deadline:
            try:
                line = self._stdout.get(timeout=1.0)
            except queue.Empty:
                continue
            match = re.match(r"serving on port (\d+)", line)
            if match:
                return int(match.group(1))
            if not line:
                break
        self.proc.kill()
        self.proc.wait()
        raise RuntimeError(f"the model server did not start: {self.log[-1] if self.log else 'no output'}")

    def wait_for_log(self, pattern: str, timeout: float = 60.0) -> re.Match:
        """The first log line matching ``pattern`` (a regular expression), waiting up to ``timeout`` seconds."""
        compiled = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._log_changed:
            while True:
                for line in self.log:
                    match = compiled.search(line)
                    if match:
                        return match
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"no server log line matches {pattern!r} after {timeout}s; last lines: {self.log[-5:]}"
                    )
                self._log_changed.wait(left)

    def log_matches(self, pattern: str) -> list[re.Match]:
        """Every log line so far that matches ``pattern``."""
        compiled = re.compile(pattern)
        with self._log_changed:
            return [m for m in map(compiled.search, self.log) if m]

    def stop(self) -> int:
        """SIGTERM, then waits for the drain; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill(self) -> None:
        """SIGKILL: no drain, connections drop."""
        self.proc.kill()
        self.proc.wait()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def poll(condition, timeout: float = 60.0, every: float = 0.1):
    """Calls ``condition`` until it returns something true; returns that (fails the test after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            assert value, f"condition not met after {timeout}s"
            return value
        time.sleep(every)


def http_call(url: str, body=None, method: str | None = None, timeout: float = 120) -> tuple[int, dict]:
    """Sends JSON (if ``body``) with urllib; returns the status and the JSON answer, errors included."""
    data = json.dumps(body).encode() if body is not None and not isinstance(body, bytes) else body
    request = urllib.request.Request(
        url,
        data=data,
        method=method or ("POST" if data is not None else "GET"),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
