"""The one error type for bad input.

Validators raise `InputError` for anything the user can fix (a missing file, a bad flag
value, a cache made for another model). The CLI catches exactly this type: it prints one
line on stderr and exits 2 (`PDENGINE_DEBUG=1` shows the traceback). Any other exception
is a bug in pdengine and keeps its traceback, so an internal error never poses as bad input.

It subclasses ValueError so library callers that catch ValueError keep working.
"""


class InputError(ValueError):
    """Bad input, explained in one line that names what to fix."""


class CommandError(Exception):
    """A command failed for a reason its message already explains (a stage's exit code, a
    quality gate not met); neither bad input nor a bug. The CLI prints the one line on
    stderr and exits with `code`."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code
