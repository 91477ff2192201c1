"""User-facing errors: one line saying what is wrong and how to fix it."""


class I2EError(Exception):
    """A problem with the user's input (file, flag, data). The CLI prints it as one line."""
