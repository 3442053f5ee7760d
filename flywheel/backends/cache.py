"""A request cache for endpoint backends: each response stored as it arrives, keyed by a hash
of the request, so a stage stopped halfway resumes without sending what was answered.

One SQLite file (the standard library's `sqlite3`, write-ahead log) in the workspace; every
`put` is committed at once, so a SIGKILL loses at most the requests in flight. The key hashes
the route, the request body and the endpoint's identity (what the server reports about the
served model), never its host, port or key: the same model moved to another port is the same
cache. The cache is never a version; `flywheel cache clear` removes it.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from flywheel.errors import FlywheelError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    key TEXT PRIMARY KEY,
    response TEXT NOT NULL,
    created REAL NOT NULL
)
"""
#: The files SQLite keeps beside the database in WAL mode.
_SIDECARS = ("-wal", "-shm", "-journal")


def canonical_json(obj: Any) -> str:
    """One text per value: sorted keys, no spaces, non-ASCII kept."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


class RequestCache:
    """Responses by request key, in one SQLite file created on the first `put`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    @staticmethod
    def key(route: str, body: dict, identity: str) -> str:
        """The hash of a request: its route (e.g. "chat.completions"), its body and the
        endpoint identity (never the URL's host/port nor the key)."""
        payload = canonical_json({"route": route, "body": body, "identity": identity})
        return hashlib.sha256(payload.encode()).hexdigest()

    # -- connection ------------------------------------------------------------------------
    def _corrupt(self, exc: Exception) -> FlywheelError:
        return FlywheelError(
            f"request cache {self.path} is unreadable ({exc})",
            details=["it holds only responses that can be asked again: clear it with "
                     "`flywheel cache clear` and rerun"])

    def _open(self, create: bool) -> sqlite3.Connection | None:
        if self._conn is not None:
            return self._conn
        if not create and not self.path.exists():
            return None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FlywheelError(f"cannot create the folder of the request cache {self.path}: "
                                f"{exc}", details=["check the workspace is writable"]) from exc
        try:
            conn = sqlite3.connect(self.path, timeout=30, check_same_thread=False,
                                   isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(_SCHEMA)
            conn.execute("SELECT count(*) FROM responses").fetchone()
        except sqlite3.DatabaseError as exc:
            raise self._corrupt(exc) from exc
        self._conn = conn
        return conn

    def close(self) -> None:
        """Close the file (a later call opens it again)."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # -- reads and writes ------------------------------------------------------------------
    def get(self, key: str) -> dict | None:
        """The stored response for `key`, or None."""
        with self._lock:
            conn = self._open(create=False)
            if conn is None:
                return None
            try:
                row = conn.execute("SELECT response FROM responses WHERE key = ?",
                                   (key,)).fetchone()
            except sqlite3.DatabaseError as exc:
                raise self._corrupt(exc) from exc
        if row is None:
            return None
        try:
            return json.loads(row[0])
        except json.JSONDecodeError as exc:
            raise self._corrupt(exc) from exc

    def put(self, key: str, response: dict) -> None:
        """Store `response` under `key`, committed before returning."""
        text = canonical_json(response)
        with self._lock:
            conn = self._open(create=True)
            try:
                conn.execute("INSERT OR REPLACE INTO responses(key, response, created) "
                             "VALUES (?, ?, ?)", (key, text, time.time()))
            except sqlite3.DatabaseError as exc:
                raise self._corrupt(exc) from exc

    def stats(self) -> tuple[int, int]:
        """(entries, bytes on disk, the WAL included); (0, 0) when there is no cache."""
        with self._lock:
            conn = self._open(create=False)
            if conn is None:
                return 0, 0
            try:
                entries = conn.execute("SELECT count(*) FROM responses").fetchone()[0]
            except sqlite3.DatabaseError as exc:
                raise self._corrupt(exc) from exc
        return int(entries), sum(p.stat().st_size for p in self._files())

    def clear(self) -> int:
        """Remove the cache's file(s); returns how many entries they held (a file too corrupt
        to count counts as 0)."""
        try:
            entries = self.stats()[0]
        except FlywheelError:
            entries = 0
        self.close()
        for p in self._files():
            p.unlink(missing_ok=True)
        return entries

    def _files(self) -> list[Path]:
        names = [self.path] + [self.path.with_name(self.path.name + s) for s in _SIDECARS]
        return [p for p in names if p.exists()]
