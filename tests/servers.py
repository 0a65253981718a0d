"""Real server processes for integration tests, on 127.0.0.1 only, stopped at the end."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

BIN = Path(sys.executable).parent

# Dummy credentials for the moto S3 server (never real ones).
S3_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-do-not-log",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A subprocess serving HTTP on 127.0.0.1:port, started and health-checked, then stopped."""

    def __init__(self, cmd: Sequence[str], port: int, health_path: str = "/", env: dict | None = None,
                 log_path: Path | None = None, timeout: float = 60.0):
        self.cmd, self.port, self.health_path = list(cmd), port, health_path
        self.env = {**os.environ, **(env or {})}
        self.log_path = log_path
        self.timeout = timeout
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """Base URL of the server."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServerProcess:
        """Start the process and wait until the health URL answers."""
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server {self.cmd[0]} exited with {self.proc.returncode}; log: {self.log_path}")
            try:
                with urllib.request.urlopen(self.url + self.health_path, timeout=2):
                    return self
            except Exception:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"server {self.cmd} did not answer on {self.url} within {self.timeout}s")

    def stop(self) -> None:
        """Terminate the process group (kill after 10 s)."""
        if self.proc is not None:
            stop_group(self.proc, grace=10)


def stop_group(*procs: subprocess.Popen, grace: float = 30) -> None:
    """SIGTERM the process groups of `procs` (started with `start_new_session=True`) all at once, SIGKILL those
    still running `grace` seconds later."""
    import signal

    running = [p for p in procs if p.poll() is None]
    for p in running:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in running:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)


def start_moto(log_dir: Path) -> ServerProcess:
    """A moto S3 server process on 127.0.0.1."""
    port = free_port()
    cmd = [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    return ServerProcess(cmd, port, "/moto-api/", env=S3_TEST_ENV, log_path=log_dir / "moto.log").start()
