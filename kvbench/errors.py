"""`KvbenchError`: the one base of the errors a user's input causes (a bad flag, file, trace,
setting). The CLI prints such an error as one `error:` line and exits 2; any other exception is
a bug and keeps its traceback. It is a ValueError, so pydantic and dataclass validation treat a
check that raises it as a validation failure."""


class KvbenchError(ValueError):
    """Something the user gave is wrong; the message says what and how to fix it."""
