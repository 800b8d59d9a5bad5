"""The one exception type for mistakes a user can fix (the CLI prints its message as one line, no traceback), and the
"did you mean" hint its messages end with."""
import difflib
from collections.abc import Iterable


class UserError(Exception):
    """A problem with the user's input (config, files, data, weights, tracking server).

    The message must name the culprit (file, field, value) and say what to do about it.
    """


def did_you_mean(word: str, choices: Iterable[str], prefix: str = "", n: int = 3, cutoff: float = 0.5) -> str:
    """"; did you mean a or b?" for the choices closest to `word` (each prefixed `prefix.`), or "" when none is
    close."""
    close = difflib.get_close_matches(word, list(choices), n=n, cutoff=cutoff)
    if not close:
        return ""
    names = [f"{prefix}.{c}" if prefix else c for c in close]
    return f"; did you mean {' or '.join(names)}?"
