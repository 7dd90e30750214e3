"""The error every command reports as one line."""


class CliError(Exception):
    """A user error reported as one line on stderr with exit code 2, never a traceback."""
