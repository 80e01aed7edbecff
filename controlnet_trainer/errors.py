"""The error types the entry scripts print as one paragraph: the message names the problem and the fix."""


class InputError(ValueError):
    """Raised before (or instead of) training when the flags, data or models cannot work.

    The entry scripts print it as one paragraph without a traceback and exit with status 2.
    """


class TrainingError(InputError):
    """Training cannot go on; the message says why and what was kept."""


class ArgumentError(InputError):
    """A flag or a combination of flags that cannot work; the message says how to fix it."""
