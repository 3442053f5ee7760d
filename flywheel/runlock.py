"""One writer per workspace: an exclusive lock file beside the catalog.

`flywheel iterate` (and a scheduled or work-pool flow run) holds `<catalog>.lock` for the
whole run; `flywheel ingest` holds it for its one commit, after waiting a bounded time for
it. The lock is an OS file lock (`flock`), so the kernel drops it the moment its process dies,
SIGKILL included; the file's content names the holder (run id, pid, host, start time). A
second run finds the lock taken and stops at once with that name. A run that finds the content
of a holder whose lock is gone knows that holder died, says so, and takes over.

DuckDB's own file lock is held only for the length of one commit, so readers (`flywheel sql`)
are never blocked by this lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO

from flywheel.errors import FlywheelError

#: lock path -> [open file, holder info, depth, the dead holder taken over]. Re-entrant within
#: one process, so the CLI can take the lock before Prefect starts and its flow take it again.
_HELD: dict[str, Held] = {}


@dataclass(frozen=True)
class Holder:
    run_id: str
    pid: int
    host: str
    started_at: str
    command: str = ""

    def describe(self) -> str:
        return (f"run {self.run_id} (pid {self.pid} on {self.host}, started {self.started_at}"
                + (f": {self.command}" if self.command else "") + ")")


def lock_path(catalog: str | Path) -> Path:
    return Path(str(catalog) + ".lock")


def read_holder(catalog: str | Path) -> Holder | None:
    """Who the lock file names (the live holder, or a dead one's leftover), if anyone."""
    try:
        text = lock_path(catalog).read_text()
    except OSError:
        return None
    try:
        d = json.loads(text)
        return Holder(d["run_id"], int(d["pid"]), d["host"], d["started_at"],
                      d.get("command", ""))
    except (ValueError, KeyError, TypeError):
        return None


@dataclass
class Held:
    """The lock this process holds on a workspace: the open lock file, who holds it (this
    run), and the dead holder whose leftover lock was taken over, if any."""

    file: IO[str]
    holder: Holder
    stale: Holder | None


def held(catalog: str | Path) -> Held | None:
    """The lock this process holds on the catalog's workspace, or None."""
    return _HELD.get(str(lock_path(catalog).resolve()))


def is_locked(catalog: str | Path) -> bool:
    """Whether a live process holds the lock now (this process included)."""
    path = lock_path(catalog)
    if str(path.resolve()) in _HELD:
        return True
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def acquire(catalog: str | Path, run_id: str, command: str = "", *, wait: float = 0.0,
            retry: str = "use another workspace (--set workspace=DIR)") -> Holder | None:
    """Take the workspace lock for `run_id`, or raise naming the run that holds it.

    `wait`: seconds to keep trying while another process holds the lock (0, the default:
    refuse at once). `retry`: the last remedy the refusal offers.
    Returns the dead holder whose leftover lock was taken over, if there was one."""
    path = lock_path(catalog)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = str(path.resolve())
    if key in _HELD:  # one holder per process: whoever took it releases it
        raise FlywheelError(f"this process holds the lock of {catalog} already (run "
                            f"{_HELD[key].holder.run_id}): a run is not started twice")
    deadline = time.monotonic() + max(wait, 0.0)
    f = open(path, "a+")
    while True:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() < deadline:
                time.sleep(min(0.1, max(deadline - time.monotonic(), 0.0)))
                continue
            f.close()
            holder = read_holder(catalog)
            who = holder.describe() if holder else "another process (no holder recorded yet)"
            waited = f" (waited {wait:g} s)" if wait > 0 else ""
            raise FlywheelError(
                f"the workspace is in use: {catalog} is locked by {who}{waited}",
                details=["only one run writes a catalog at a time; nothing was written",
                         "wait for that run to finish (`flywheel status` shows its progress), "
                         "stop it"
                         + (f" (`kill {holder.pid}` on {holder.host})" if holder else "")
                         + f", or {retry}",
                         "reading is not blocked: `flywheel sql` works while it runs"]) from None
    stale = read_holder(catalog)
    holder = Holder(run_id, os.getpid(), socket.gethostname(),
                    datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"), command)
    f.seek(0)
    f.truncate()
    f.write(json.dumps(holder.__dict__))
    f.flush()
    os.fsync(f.fileno())
    _HELD[key] = Held(f, holder, stale)
    return stale


def release(catalog: str | Path) -> None:
    """Release the lock this process holds: empty the file and unlock it."""
    key = str(lock_path(catalog).resolve())
    entry = _HELD.pop(key, None)
    if entry is None:
        return
    f = entry.file
    try:
        f.seek(0)
        f.truncate()
        f.flush()
    finally:
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        f.close()
