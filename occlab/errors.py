"""User-facing errors: the command line prints these as one line, without a traceback."""


class OcclabError(Exception):
    """Bad input from the user (a path, a name, a shape): the message says what was expected."""
