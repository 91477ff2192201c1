"""User-facing errors and warnings: one line saying what is wrong and how to fix it."""

from __future__ import annotations

import logging

# Warnings go through this logger (the CLI prints them as one literal line on stderr; without
# a handler, Python's last-resort handler prints them the same way).
logger = logging.getLogger("i2e_deploy")


class I2EError(Exception):
    """A problem with the user's input (file, flag, data). The CLI prints it as one line and
    exits with ``exit_code``."""

    exit_code = 2


def warn(message: str) -> None:
    logger.warning(message)


class VerificationError(I2EError):
    """A model file or runner that does not compute what its reference computes: refused
    (exit 1, as a failing parity check), not a usage error (exit 2)."""

    exit_code = 1


class SourceLostError(I2EError):
    """A stream's source failed or was lost for good mid-run (the outputs hold what came
    before): exit 3, which a restart policy may retry, unlike bad input (exit 2)."""

    exit_code = 3
