"""The one exception type for user mistakes: bad config values, bad files, bad checkpoints."""


class ConfigError(ValueError):
    """A user-facing error that names the offending config key or file and what would be valid.

    The command-line entry point prints these as one clean message (no traceback) and exits non-zero.
    """
