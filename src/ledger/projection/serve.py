"""The query path through the owning process: a local socket served by the runner.

While ``ledger project --follow`` runs it owns the DuckDB file, and it answers
read-only queries on ``$LEDGER_HOME/projections.sock`` (a Unix socket, so only
users who may open the home directory can ask). Each query runs on its own
DuckDB connection to the same database: it sees committed batches only (MVCC),
never a half-applied one, and results are as fresh as the last batch — no
snapshot copy in between. Only single SELECT-like statements are accepted.

Wire format: the client sends a 4-byte big-endian length and the SQL (UTF-8);
the server replies with a status byte (0 ok, 1 error), an 8-byte length and
either an Arrow IPC stream or the error message.
"""

from __future__ import annotations

import contextlib
import socket
import socketserver
import struct
import threading
from pathlib import Path

import duckdb
import pyarrow as pa

from ledger.ledger import LedgerError
from ledger.settings import Settings

_ALLOWED = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}
_HEADER = struct.Struct(">BQ")
_MAX_SQL = 1 << 20


def socket_path(settings: Settings) -> Path:
    return settings.projections_path.with_name("projections.sock")


class ReadOnlyError(ValueError):
    """The statement would change something; the query path only reads."""


def run_read_only(con: duckdb.DuckDBPyConnection, text: str) -> pa.Table:
    """Run one SELECT (or EXPLAIN) statement and return its rows as Arrow."""
    statements = con.extract_statements(text)
    if len(statements) != 1:
        raise ReadOnlyError(f"expected one SQL statement, got {len(statements)}")
    if statements[0].type not in _ALLOWED:
        raise ReadOnlyError(
            f"the projections are read-only here: {statements[0].type.name} statements are "
            "not allowed (only SELECT)"
        )
    result = con.sql(text)
    return pa.table({}) if result is None else result.to_arrow_table()


class _Handler(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        head = self.rfile.read(4)
        if len(head) != 4:
            return
        (size,) = struct.unpack(">I", head)
        if size > _MAX_SQL:
            self._reply(1, f"the query is {size:,} bytes; at most {_MAX_SQL:,}".encode())
            return
        text = self.rfile.read(size).decode("utf-8", errors="replace")
        try:
            with self.server.lock:
                table = run_read_only(self.server.reader, text)
        except (duckdb.Error, ReadOnlyError) as exc:
            self._reply(1, str(exc).encode())
            return
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        self._reply(0, sink.getvalue().to_pybytes())

    def _reply(self, status: int, payload: bytes) -> None:
        self.wfile.write(_HEADER.pack(status, len(payload)))
        self.wfile.write(payload)


class _Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    reader: duckdb.DuckDBPyConnection
    lock: threading.Lock


class QueryServer:
    """Serves read-only queries on ``path`` from a connection to the runner's database."""

    def __init__(self, con: duckdb.DuckDBPyConnection, path: Path):
        self.path = path
        # A stale socket from a killed runner: nobody answers on it, so it can go.
        if path.exists() and ask(path, "SELECT 1") is None:
            path.unlink()
        self._server = _Server(str(path), _Handler)
        self._server.reader = con.cursor()
        self._server.reader.execute("SET TimeZone = 'UTC'")
        self._server.lock = threading.Lock()
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="projection-queries", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._server.reader.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def __enter__(self) -> QueryServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = sock.recv(min(n, 1 << 20))
        if not chunk:
            raise ConnectionError("the runner closed the connection mid-answer")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def ask(path: Path, text: str, timeout: float = 60.0) -> pa.Table | None:
    """Run ``text`` through a live runner's socket; None when no runner answers there."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            return None
        data = text.encode()
        sock.sendall(struct.pack(">I", len(data)) + data)
        status, size = _HEADER.unpack(_read_exactly(sock, _HEADER.size))
        payload = _read_exactly(sock, size)
    finally:
        sock.close()
    if status != 0:
        raise LedgerError(f"the query failed: {payload.decode(errors='replace')}")
    return pa.ipc.open_stream(payload).read_all()
