"""The training loop, optimizer and schedule, evaluation, metrics and console output."""
