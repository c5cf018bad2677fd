"""Process groups and the parallelisms applied to the model from outside it."""
