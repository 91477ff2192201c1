"""Device names: ``cpu``, ``cuda``, ``cuda:N``."""
from __future__ import annotations

import re

from .errors import I2EError


def parse_device(device: str) -> tuple[str, int]:
    """'cpu' -> ('cpu', 0); 'cuda' / 'cuda:N' -> ('cuda', N)."""
    match = re.fullmatch(r"(cpu|cuda)(?::(\d+))?", device.strip().lower())
    if not match or (match.group(1) == "cpu" and match.group(2)):
        raise I2EError(f"unknown device {device!r}; use cpu, cuda or cuda:N")
    return match.group(1), int(match.group(2) or 0)
