"""One first-use build at a time per build folder, under a lock that dies with its process.

torch's ``cpp_extension.load`` guards a build folder with a ``lock`` file that it creates and
deletes (``FileBaton``): a build that is killed (Ctrl-C at the wrong moment, an out-of-memory
kill) leaves the file behind, and every later process waits on it forever, printing nothing.
Here the build runs under ``fcntl.flock`` on ``aia_build.lock`` in the same folder: the kernel
releases it when its holder dies, however it dies. Whoever holds it is the only aia_kernels
process building in that folder, so a torch ``lock`` file found then is stale and is removed.
A second process that starts meanwhile says whom it waits for, waits, then finds the build
done (ninja has nothing to do) and loads it: one build, both run. (The folder is this
extension's alone: torch's default is one folder per extension, and ``AIA_KERNELS_BUILD_DIR``
must not be shared with other extensions' builds, whose live lock file would look stale.)

Without ``fcntl`` (Windows) only torch's own lock file guards the folder.
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

LOCK_NAME = "aia_build.lock"
TORCH_LOCK_NAME = "lock"  # torch.utils.file_baton.FileBaton's file in the build folder


def say(message: str) -> None:
    """One line on stderr: what the loader does while the user waits (not a warning: nothing is wrong)."""
    print(f"aia_kernels: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def exclusive_build(directory: str):
    """Hold the build lock of ``directory`` (waiting, visibly, for a live builder) and clear a
    stale torch lock file. Raises RuntimeError if the folder cannot hold the lock (read-only)."""
    if fcntl is None:
        yield
        return
    path = Path(directory) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise RuntimeError(f"the native build folder {directory} is not writable ({exc}); set "
                           f"AIA_KERNELS_BUILD_DIR to a writable folder") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            say(f"waiting for the native build in progress in {directory} (process {holder})")
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        stale = Path(directory) / TORCH_LOCK_NAME
        if stale.exists():
            # Only a holder of this lock builds here, so the file is left by a build that died.
            say(f"removing {stale}, left by an interrupted build")
            stale.unlink(missing_ok=True)
        yield
    finally:
        os.close(fd)  # releases the flock


def needs_build(directory: str, name: str, sources_root: Path) -> bool:
    """Whether the library ``name`` in ``directory`` is missing or older than a file of the
    sources (then load() compiles, and says so first). Changed flags alone also rebuild,
    unannounced: torch decides that inside its load()."""
    from torch.utils.cpp_extension import LIB_EXT
    library = Path(directory) / f"{name}{LIB_EXT}"
    if not library.is_file():
        return True
    built = library.stat().st_mtime
    return any(p.stat().st_mtime > built for p in Path(sources_root).rglob("*") if p.is_file())
