"""The one exception type that reaches the user as a single line (the CLI turns it into exit code 1)."""


class PartrainError(Exception):
    """A problem the user can fix: bad input, missing file, incompatible run. Message is one line."""


class WorkerLost(PartrainError):
    """A worker process died (killed, or exited without reporting an error): the step it was in
    can be done again by fresh workers (`--on-worker-failure restart`)."""

    def __init__(self, message: str, worker: int):
        super().__init__(message)
        self.worker = worker
