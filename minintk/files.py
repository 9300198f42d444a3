"""Files of resumable runs: atomic writes and content digests (distributed tiles, width scans, paper runs)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def write_atomic(path: Path, data: bytes) -> None:
    """Write via a temporary file and a rename, so a reader sees the old file or the whole new one."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, obj, indent: int | None = 1) -> None:
    """obj as JSON at path, atomically (write_atomic)."""
    write_atomic(path, (json.dumps(obj, indent=indent) + "\n").encode())


def json_digest(obj) -> str:
    """sha256 (hex) of obj's canonical JSON (sorted keys; non-JSON values by str)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
