"""Errors a user fixes by changing the config, the command line or the input files (the `qponder` CLI prints them as
one line)."""


class ConfigError(ValueError):
    """A config value that cannot work; the message names the config field and what to set it to."""


class DataError(ValueError):
    """Input data that cannot be used (a malformed line, a file whose every record is unusable); the message names the
    file and line."""
