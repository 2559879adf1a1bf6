"""Exceptions that carry a one-line, actionable message. The CLI prints them without a traceback."""


class Llm2ClipError(Exception):
    """Base class: the message says what is wrong and how to fix it."""


class ConfigError(Llm2ClipError, ValueError):
    """A config problem found before any work started; the message names the key and the fix."""


class DataError(Llm2ClipError, ValueError):
    """Bad input data under strict mode; the message names the file (and line or key) and the fix."""


def one_line(text: str) -> str:
    """Control characters and lone surrogates escaped ('\\n', '\\udcff'), everything else as typed: error
    messages echo paths, keys and values from user data and must stay one readable line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
