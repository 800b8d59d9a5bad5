"""The one exception type for mistakes a user can fix: the CLI prints its message as one line, no traceback."""


class UserError(Exception):
    """A problem with the user's input (config, files, data, weights, tracking server).

    The message must name the culprit (file, field, value) and say what to do about it.
    """
