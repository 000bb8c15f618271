"""Errors the CLI reports as one line with exit code 2 (bad input), as opposed to internal failures."""


class UserError(Exception):
    """Bad input: the message names the problem and the fix."""


class GridFailed(Exception):
    """Every run of a grid that ran failed (exit code 1; each error is already printed)."""
