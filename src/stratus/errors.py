"""The exceptions the CLI turns into exit codes: a user's mistake (StratusError: one line,
exit 2) and a run that stopped on purpose (RunStopped)."""


class StratusError(Exception):
    """Bad input (config, flags, files): the message says what is wrong and what to do."""


class RunStopped(Exception):
    """The run stopped on purpose (repeated spikes, a failed save with on_failure = stop):
    restarting would not help, so supervisors do not."""
