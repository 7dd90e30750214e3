"""The one family of user errors: bad input, configuration or files, reported by the command as one line."""


class TorchcvtError(ValueError):
    """A user error: what was given cannot be done, said in one line that names the key, path or value.

    A ValueError, so callers that caught ValueError before keep working; the command shows its message
    alone, while any other exception (a bug) keeps its traceback.
    """


def shorten(text: str, limit: int = 80) -> str:
    """text cut to at most limit characters, marked where cut: user values in messages stay one short line."""
    return text if len(text) <= limit else f"{text[: limit - 25]}... ({len(text)} characters)"


def shown(value: object, limit: int = 80) -> str:
    """repr(value) for an error message, cut to at most limit characters (never built whole: a value
    may be a list of millions)."""
    import reprlib

    brief = reprlib.Repr()
    brief.maxlist = brief.maxtuple = brief.maxdict = brief.maxset = 8
    brief.maxstring = brief.maxother = brief.maxlong = limit
    brief.maxlevel = 4
    return shorten(brief.repr(value), limit)
