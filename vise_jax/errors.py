"""Errors caused by the user's input or configuration, as opposed to bugs.

Launch scripts print these as one clear message and exit non-zero, without a traceback.
"""


class InputError(ValueError):
    """Bad input data or configuration; the message names the file, row and field."""


class TrainingError(RuntimeError):
    """A run that cannot go on (e.g. a non-finite loss); the message names the step and head."""
