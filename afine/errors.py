"""The one exception type for user mistakes (bad paths, files, labels, keys).

Command-line tools catch it, print its message as one line on stderr and exit 2.
"""


class AfineError(Exception):
    """A user-facing error whose message names the file, line or key at fault."""
