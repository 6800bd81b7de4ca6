"""Exceptions raised for user mistakes. The CLI prints them as one line, never as a traceback."""


class DN2Error(ValueError):
    """A bad input: wrong argument, shape, file or configuration. The message names the problem."""


class DN2FileError(DN2Error, FileNotFoundError):
    """A file or directory that is missing, unreadable or corrupt. The message names the path."""
