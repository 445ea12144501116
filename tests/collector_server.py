"""A real collector for tests: `ledger serve` as its own process on a free loopback port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

from conftest import TEST_MASTER_KEY


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cli_env(
    home: Path, store_url: str | None = None, extra: dict[str, str] | None = None
) -> dict[str, str]:
    env = {**os.environ, "LEDGER_HOME": str(home), "LEDGER_MASTER_KEY": TEST_MASTER_KEY}
    env.pop("LEDGER_STORE_URL", None)
    env.pop("LEDGER_KAFKA", None)
    if store_url:
        env["LEDGER_STORE_URL"] = store_url
    env.update(extra or {})
    return env


def add_source(home: Path, name: str, *channels: str, store_url: str | None = None) -> str:
    args = [a for c in channels for a in ("--channel", c)]
    done = subprocess.run(
        [sys.executable, "-m", "ledger", "sources", "add", name, *args],
        capture_output=True,
        text=True,
        env=cli_env(home, store_url),
        timeout=60,
        check=True,
    )
    return done.stdout.strip()


class Server:
    """Starts `ledger serve`; ``url`` is its base address once it answers /health."""

    def __init__(
        self,
        home: Path,
        store_url: str | None = None,
        port: int | None = None,
        env: dict[str, str] | None = None,
        workers: int = 1,
        args: tuple[str, ...] = (),
    ):
        self.home = home
        self.workers = workers
        self.args = args
        self.store_url = store_url
        self.env = env
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Server:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                *("-m", "ledger", "serve", "--port", str(self.port)),
                *(("--workers", str(self.workers)) if self.workers > 1 else ()),
                *self.args,
            ],
            env=cli_env(self.home, self.store_url, self.env),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"ledger serve exited with {self.proc.returncode}: {err}")
            try:
                if requests.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except requests.ConnectionError:
                time.sleep(0.1)
        raise RuntimeError("ledger serve did not answer /health within 30 s")

    def kill(self) -> None:
        """SIGKILL: no graceful shutdown, as a crash."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> str:
        """SIGTERM and wait; returns what it wrote on stderr."""
        if self.proc is None or self.proc.poll() is not None:
            return ""
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return self.proc.stderr.read().decode() if self.proc.stderr else ""
