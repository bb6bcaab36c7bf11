"""A real ``mlflow server`` process on 127.0.0.1 with a SQLite backend, for tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from ports import free_port


class MlflowServer:
    """One server on a fixed port and store: ``stop()`` then ``start()`` is an outage the clients see, data kept."""

    def __init__(self, root: Path, port: int | None = None):
        self.root = Path(root)
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> str:
        """Returns the URI once /health answers."""
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
             "--artifacts-destination", (self.root / "server-artifacts").as_uri()],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as r:
                    if r.status == 200:
                        return self.uri
            except OSError:
                if time.time() > deadline or self.process.poll() is not None:
                    self.stop()
                    raise AssertionError("mlflow server did not come up") from None
                time.sleep(0.2)

    def stop(self) -> None:
        """Until it no longer answers: the port refuses connections afterwards."""
        if self.process is None:
            return
        # The whole group: the server's web workers are its children, and any left would keep the port.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None


@contextlib.contextmanager
def mlflow_server(root: Path, port: int | None = None):
    """Yields the server's URI once /health answers; its store and artifacts live under ``root``."""
    server = MlflowServer(root, port)
    try:
        yield server.start()
    finally:
        server.stop()
