"""The one error type of advfast.interop.

It subclasses ValueError, so every advfast CLI already turns it into one line on stderr and exit
code 2 (advfast/cli.py and advfast/eval/cli.py map ValueError to a usage error).
"""


class InteropError(ValueError):
    """A checkpoint that cannot be read as the format asked for, or an encoder a format cannot hold."""
