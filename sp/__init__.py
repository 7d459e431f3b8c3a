"""Sequence parallelism applied to a built model from outside (process groups passed in)."""
