"""Errors a user can fix (bad input, missing files): the CLI prints them on one line and exits with code 2."""


class UserError(Exception):
    """Bad input: a one-line message that says what is wrong and, where possible, how to fix it."""


class InvalidConfig(UserError, ValueError):
    """A config value out of range or of the wrong type: a :class:`UserError` for the command line, and a
    ``ValueError`` for code that builds configs (as ``transformers`` configs raise)."""
