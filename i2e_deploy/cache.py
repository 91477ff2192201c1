"""One export cache for every tool (stream, demo, benchmark): ``$I2E_CACHE``, by default
~/.cache/i2e-deploy; a file's name carries the sha256 of the checkpoint, the export options and
the package version, so a changed model or a new release never reuses a stale export."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

from .version import __version__
from .artifacts import engine_sidecar_path
from .card import sha256_file
from .fileio import temp_beside


def cache_dir() -> Path:
    return Path(os.environ.get("I2E_CACHE", Path.home() / ".cache" / "i2e-deploy")).expanduser()


def cache_key(checkpoint: Path, **options: Any) -> str:
    """sha256 of the checkpoint, the export options and the package version."""
    text = json.dumps({"sha256": sha256_file(checkpoint), "version": __version__, **options},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached_export(checkpoint: Path, suffix: str, build: Callable[[Path], Any], *,
                  cache: Path | None = None, **options: Any) -> Path:
    """The cached export of ``checkpoint`` for these options, made by ``build(path)`` (into a
    temporary name, then renamed) when missing. An engine's sidecar moves with it."""
    cache = cache or cache_dir()
    label = "-".join(str(options[k]) for k in ("backend", "precision") if k in options)
    target = cache / f"{checkpoint.stem}-{label}-{cache_key(checkpoint, **options)}{suffix}"
    if not target.is_file():
        tmp = temp_beside(target, f".tmp{suffix}")  # builders check the suffix
        try:
            build(tmp)
            if engine_sidecar_path(tmp).is_file():
                os.replace(engine_sidecar_path(tmp), engine_sidecar_path(target))
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
            engine_sidecar_path(tmp).unlink(missing_ok=True)
    return target
