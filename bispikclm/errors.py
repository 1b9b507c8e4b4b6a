"""Errors a user can fix (bad input, missing files): the CLI prints them on one line and exits with code 2."""


class UserError(Exception):
    """Bad input: a one-line message that says what is wrong and, where possible, how to fix it."""
