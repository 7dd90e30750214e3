"""The one family of user errors: bad input, configuration or files, reported by the command as one line."""


class TorchcvtError(ValueError):
    """A user error: what was given cannot be done, said in one line that names the key, path or value.

    A ValueError, so callers that caught ValueError before keep working; the command shows its message
    alone, while any other exception (a bug) keeps its traceback.
    """
