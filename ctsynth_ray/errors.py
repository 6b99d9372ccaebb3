"""The one exception type for problems a user can fix (bad input, bad options)."""


class CtsynthError(Exception):
    """A user-facing error: its message is one line naming the file or volume and the problem.

    The CLI prints it without a traceback and exits 1.
    """
