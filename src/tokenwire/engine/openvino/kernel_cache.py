"""OpenVINO's compiled-model cache (its ``CACHE_DIR`` property), kept to a bounded size.

OpenVINO writes a blob there for each model and compile setting it compiles (about 135 MB for the default model),
and reads it back at the next start instead of compiling again (seconds saved). It never removes one: a server
started with other threads, precisions or models leaves another each time. So each start of the engine removes
the least recently used blobs beyond ``KEEP_BYTES``, always keeping the newest. A blob another process is
reading stays readable (an open file outlives its name); one that is gone is compiled and written again.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from tokenwire.engine import models

log = logging.getLogger(__name__)

FOLDER = "openvino-kernels"  # in tokenwire's cache directory
KEEP_BYTES = 2 << 30


def folder() -> Path:
    return models.cache_dir() / FOLDER


def prune(where: Path, keep_bytes: int = KEEP_BYTES) -> list[Path]:
    """Remove the least recently used files of ``where`` beyond ``keep_bytes`` (the newest always stays);
    returns what was removed. A folder that cannot be read is left alone."""
    files: list[tuple[float, int, Path]] = []
    try:
        for path in where.iterdir():
            with contextlib.suppress(OSError):
                st = path.stat()
                if path.is_file():
                    files.append((max(st.st_mtime, st.st_atime), st.st_size, path))
    except OSError:
        return []
    files.sort(reverse=True)  # newest first
    removed: list[Path] = []
    total = 0
    for i, (_, size, path) in enumerate(files):
        total += size
        if i > 0 and total > keep_bytes:
            with contextlib.suppress(OSError):
                path.unlink()
                removed.append(path)
    if removed:
        log.info(
            "removed %d least recently used compiled models from %s (kept %.1f GB)",
            len(removed),
            where,
            keep_bytes / (1 << 30),
        )
    return removed
