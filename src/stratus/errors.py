"""The one exception type for a user's mistake: the CLI prints its message and exits 2."""


class StratusError(Exception):
    """Bad input (config, flags, files): the message says what is wrong and what to do."""
