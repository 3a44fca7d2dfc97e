"""Atomic file writes: a temporary file in the target folder, renamed into place."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path) -> Iterator[str]:
    """Yield a temporary path beside ``path``; rename it to ``path`` if the block succeeds.

    On failure the temporary file is removed, so no half-written file is left.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # an ordinary file: mkstemp's (and writers') 0600 would make it private
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
