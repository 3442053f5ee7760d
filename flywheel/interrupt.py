"""Stopping a run cleanly on SIGINT (Ctrl-C) or SIGTERM.

`flywheel iterate` installs `handle` for both signals. A signal records a stop request; where
the run then stops depends on what it is doing:

- computing a stage (`computing()`, entered by the main thread): `Interrupted` is raised at
  once, inside the computation, whose results are not committed;
- committing a stage (`committing()`): the commit finishes (it is one transaction either way),
  and the run stops at the next check;
- anything else (Prefect's bookkeeping, recording events): the run stops at the next `check()`,
  made before each stage, before each commit, between generation batches and between training
  steps. A second signal stops it at once (outside a commit); a third ends the process.

Python runs signal handlers in the main thread only; a stage computed in another thread stops
at its next check.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from flywheel.errors import Interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)

_requested: int | None = None  # the first signal received
_count = 0  # signals received
_mode = "normal"  # what the main thread is doing: normal | computing | committing
_raised = False  # whether the run is already stopping (`Interrupted` raised)
_installed = False


def _stop() -> Interrupted:
    global _raised
    _raised = True
    return Interrupted(_requested)


def handle(signum: int, frame=None) -> None:
    """The handler of SIGINT and SIGTERM: record the stop; raise where that is safe (once:
    a signal while the run is already stopping does not cut its record short). A third
    signal ends the process at once, as if flywheel did not handle it (the kernel frees the
    workspace lock; the run shows as `interrupted`, the stage in flight unfinished)."""
    global _requested, _count
    _count += 1
    if _requested is None:
        _requested = signum
    if _count >= 3:
        import os

        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    if not _raised and (_mode == "computing" or (_mode == "normal" and _count > 1)):
        raise _stop()


def install() -> None:
    """Handle SIGINT and SIGTERM with `handle` (main thread only; elsewhere a no-op)."""
    global _installed
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in SIGNALS:
        signal.signal(sig, handle)
    _installed = True


def reclaim() -> None:
    """Take SIGTERM back from Prefect's flow engine, which handles it for the length of a flow
    (raising wherever the flow is, a commit included): a no-op unless `install` ran."""
    if _installed:
        install()


def requested() -> int | None:
    """The signal that asked the run to stop, if one did."""
    return _requested


def request(signum: int) -> None:
    """Ask the run to stop as if `signum` had arrived, without raising here."""
    global _requested, _count
    _count += 1
    if _requested is None:
        _requested = signum


def reset() -> None:
    """Forget a stop request and the installed handlers' state (tests running stages in one
    process)."""
    global _requested, _count, _mode, _raised, _installed
    _requested, _count, _mode, _raised, _installed = None, 0, "normal", False, False


def check() -> None:
    """Raise `Interrupted` if a stop was requested."""
    if _requested is not None:
        raise _stop()


@contextmanager
def _main_thread_mode(mode: str, check_first: bool) -> Iterator[None]:
    """Set the main thread's mode, then check (a signal in between is seen by one or the
    other); other threads only check."""
    global _mode
    if threading.current_thread() is not threading.main_thread():
        if check_first:
            check()
        yield
        return
    saved, _mode = _mode, mode
    try:
        if check_first:
            check()
        yield
    finally:
        _mode = saved


def computing():
    """A stage's computation: its results are discarded if it is stopped, so a signal raises
    `Interrupted` right where it lands. Checks first."""
    return _main_thread_mode("computing", True)


def committing():
    """A commit and its bookkeeping: a signal waits for it to finish. Checks first, so a
    stage whose stop was requested commits nothing."""
    return _main_thread_mode("committing", True)


def deferred():
    """Bookkeeping that must not be cut short (recording how a run ended): a signal waits for
    it. Does not check."""
    return _main_thread_mode("committing", False)
