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
