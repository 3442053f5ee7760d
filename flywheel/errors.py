"""One error type for everything a user can get wrong.

Messages say what was given, why it fails, and what to do next.
"""


class FlywheelError(Exception):
    """A user-facing error: the CLI prints its message (no traceback) and exits with code 2."""

    def __init__(self, message: str, *, details: list[str] | None = None):
        self.details = list(details or [])
        if self.details:
            message = message + "\n" + "\n".join(f"  - {d}" for d in self.details)
        super().__init__(message)


class Interrupted(BaseException):
    """A run stopped by SIGINT (Ctrl-C) or SIGTERM: raised at a point where nothing of the
    stage in flight is committed. A BaseException, like KeyboardInterrupt, so that no
    `except Exception` on the way swallows it; the CLI prints one line saying where the run
    stopped and how to resume, and exits with 128 + the signal's number (130, 143)."""

    def __init__(self, signum: int):
        import signal

        self.signum = int(signum)
        self.signame = signal.Signals(self.signum).name
        self.round: int | None = None  # where the run stopped, filled in by the run
        self.stage: str | None = None
        self.recorded = False  # whether the run's `interrupted` event was written
        self.rounds: int | None = None  # the last round the interrupted run asked for
        super().__init__(self.signame)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
