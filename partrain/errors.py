"""The one exception type that reaches the user as a single line (the CLI turns it into exit code 1)."""


class PartrainError(Exception):
    """A problem the user can fix: bad input, missing file, incompatible run. Message is one line."""
