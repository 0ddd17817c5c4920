"""Exceptions users can act on; the command maps them to exit codes (README)."""


class InputError(ValueError):
    """Bad input or usage: the message names the file (or option) and the problem. Exit code 2."""


class RegistrationFailure(RuntimeError):
    """A runtime failure the user cannot fix by changing the input (e.g. out of memory). Exit 3."""
