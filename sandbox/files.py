"""How sandbox state reaches the disk: whole files, atomically, readable by their owner only.

The state directory holds generated keys and the emulators' data (private metadata, customers), so every
file is written with mode 0600 to a temporary name, fsynced and renamed over the old one: a crash or a
second process never sees half a file.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def write_private_file(path: Path, payload: bytes) -> None:
    tmp = _write_temporary(path, payload)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def create_private_file(path: Path, payload: bytes) -> bool:
    """Write `path` only if it does not exist yet; False when another process created it first."""
    tmp = _write_temporary(path, payload)
    try:
        # link() fails if the target exists: exactly one of two racing processes wins.
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def _write_temporary(path: Path, payload: bytes) -> Path:
    """`payload` in a new owner-only file beside `path`, flushed to disk."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp
