"""The exception type for problems a user can fix (bad input, bad options), and the warning type for set-ups
that run but may mislead."""


class CtsynthError(Exception):
    """A user-facing error: each line of its message names a file or volume and one problem.

    The CLI prints every line (``ctsynth: error: ...``) without a traceback and exits 1.
    """


class CtsynthWarning(UserWarning):
    """A set-up that runs but deserves a second look (the CLI prints ``ctsynth: warning: ...``)."""
