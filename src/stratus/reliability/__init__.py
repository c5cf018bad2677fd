"""Surviving faults: injection, watchdog, anomaly handling, stragglers, supervisor, goodput."""

# Exit codes a supervisor reads: 2 is a user's mistake, 3 a run stopped on purpose (crash loop,
# repeated spikes): neither is worth a restart. Anything else is.
EXIT_USER_ERROR = 2
EXIT_STOPPED = 3
EXIT_HANG = 4
EXIT_ENGINE_FAILED = 5  # `stratus serve`: the inference engine itself failed (a device error)
