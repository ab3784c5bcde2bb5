"""The one exception type for mistakes a user can make (bad path, key, value, file).

The CLI turns a :class:`JaxcompError` into one line on stderr and exit code 2; anything
else is a bug and keeps its traceback.
"""


class JaxcompError(Exception):
    """A user-caused error: the message names the file, key or param path at fault."""
