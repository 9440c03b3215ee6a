"""Errors the CLI reports as one line (`error: <msg>`, exit code 2)."""


class ConfigError(Exception):
    """A problem in the user's configuration or inputs, found before any work starts.

    The message is a single line that names the problem and the fix.
    """

    def __init__(self, message: str):
        # Keep the one-line promise even when a caller passes multi-line text.
        super().__init__(" ".join(str(message).split()))


class RunFailed(Exception):
    """A run that started but could not produce a result (exit code 1, one line)."""
