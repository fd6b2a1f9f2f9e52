"""Errors a user fixes by changing the config or the command line (the `qponder` CLI prints them as one line)."""


class ConfigError(ValueError):
    """A config value that cannot work; the message names the config field and what to set it to."""
