"""One export cache for every tool (stream, demo, benchmark): ``$I2E_CACHE``, by default
~/.cache/i2e-deploy; a file's name carries the sha256 of the checkpoint, the export options, the
package version and the exporting code, so a changed model, a new release or an edited
checkout never reuses a stale export. The
verdicts of on-target verification live beside the exports (``verified/``), one JSON file per
artifact and device, so an artifact is verified once on each machine."""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .artifacts import engine_sidecar_path
from .card import sha256_file
from .fileio import atomic_output, temp_beside
from .version import __version__

VERDICTS = "verified"
REFUSALS = "refused"  # runners --backend auto moved past: not built or tried again
PACKAGE = Path(__file__).resolve().parent
# What builds an artifact: the model definition, the deploy transforms, the precisions.
EXPORTING_CODE = ("model", "export", "calibration", "targets.py")


@functools.cache
def code_digest(package: Path = PACKAGE) -> str:
    """sha256 of the package's exporting code (``EXPORTING_CODE``)."""
    digest = hashlib.sha256()
    for entry in EXPORTING_CODE:
        path = package / entry
        for source in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            digest.update(source.relative_to(package).as_posix().encode())
            digest.update(source.read_bytes())
    return digest.hexdigest()


def cache_dir() -> Path:
    return Path(os.environ.get("I2E_CACHE", Path.home() / ".cache" / "i2e-deploy")).expanduser()


def cache_key(checkpoint: Path, **options: Any) -> str:
    """sha256 of the checkpoint, the export options, the package version and its exporting
    code."""
    text = json.dumps(
        {
            "sha256": sha256_file(checkpoint),
            "version": __version__,
            "code": code_digest(),
            **options,
        },
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached_export(
    checkpoint: Path,
    suffix: str,
    build: Callable[[Path], Any],
    *,
    cache: Path | None = None,
    **options: Any,
) -> Path:
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


def verdict_path(key: dict[str, Any], cache: Path | None = None) -> Path:
    """Where the verdict for ``key`` (artifact sha256, runner, device, GPU, versions) lives."""
    text = json.dumps({"version": __version__, **key}, sort_keys=True)
    return (
        (cache or cache_dir()) / VERDICTS / f"{hashlib.sha256(text.encode()).hexdigest()[:16]}.json"
    )


def refusal_path(key: dict[str, Any], cache: Path | None = None) -> Path:
    return verdict_path(key, cache).parent.parent / REFUSALS / verdict_path(key, cache).name


def read_refusal(key: dict[str, Any], cache: Path | None = None) -> dict[str, Any] | None:
    try:
        return json.loads(refusal_path(key, cache).read_text())
    except (OSError, ValueError):
        return None  # none yet, or unreadable: try the runner again


def write_refusal(key: dict[str, Any], record: dict[str, Any], cache: Path | None = None) -> Path:
    path = refusal_path(key, cache)
    with atomic_output(path, "w") as fh:
        json.dump({**record, "key": key}, fh, indent=2)
        fh.write("\n")
    return path


def read_verdict(key: dict[str, Any], cache: Path | None = None) -> dict[str, Any] | None:
    path = verdict_path(key, cache)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # none yet, or unreadable: verify again


def write_verdict(key: dict[str, Any], record: dict[str, Any], cache: Path | None = None) -> Path:
    path = verdict_path(key, cache)
    with atomic_output(path, "w") as fh:
        json.dump({**record, "key": key}, fh, indent=2)
        fh.write("\n")
    return path


def verdicts_for(sha256: str, cache: Path | None = None) -> list[dict[str, Any]]:
    """Every verdict recorded here for the artifact with this sha256 (for ``info``)."""
    folder = (cache or cache_dir()) / VERDICTS
    found = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else ():
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if record.get("key", {}).get("sha256") == sha256:
            found.append(record)
    return found
