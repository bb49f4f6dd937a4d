"""Directories the commands write to, checked before any work that would be lost."""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from saestream.common.errors import UserError

log = logging.getLogger("saestream.files")


def check_writable_dir(path: Path, flag: str) -> None:
    """UserError (`FLAG PATH: not writable (reason)`) unless `path` exists, or can be made,
    as a directory where a file can be written and synced: checked at start-up, so a
    read-only, full or misnamed directory costs no training time."""
    try:
        probe_dir(path)
    except OSError as exc:
        raise UserError(f"{flag} {path}: not writable ({exc.strerror or exc})") from None


def probe_dir(path: Path) -> None:
    """Make `path` (parents too) and write, sync and remove a temporary file in it; OSError
    when the directory is read-only, full or not one."""
    Path(path).mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path, prefix=".tmp-probe-") as fh:
        fh.write(b"saestream")
        fh.flush()
        os.fsync(fh.fileno())


@contextmanager
def dir_locked(path: Path | None, flag: str, busy: str) -> Iterator[None]:
    """This process's exclusive use of the directory `path` (checked writable, created if
    missing) for the block; a second process gets UserError (`FLAG PATH: BUSY`). The lock is
    flock(2) on the directory itself: nothing is written into it, nothing is left behind,
    and the kernel drops it when the process dies, kill -9 included, so it is never stale.
    None: no directory, no lock."""
    if path is None:
        yield
        return
    check_writable_dir(path, flag)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)  # not inherited by what it runs
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{flag} {path}: {busy}") from None
        except OSError as exc:  # a filesystem without locks (some network mounts)
            log.warning("%s %s: cannot be locked (%s), so nothing stops a second process from "
                        "using it at the same time", flag, path, exc.strerror or exc)
        yield
    finally:
        os.close(fd)


def file_mode() -> int:
    """The mode a new file gets by default (0o666 less the umask): for files written by
    tools that create them private (safetensors writes 0o600), so a daemon of another user
    in the group, such as an evaluator, can read them as it can the rest of a snapshot."""
    try:  # Linux: read without changing it (os.umask would, for every thread)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def check_writable_file(path: Path, flag: str) -> None:
    """UserError (`FLAG PATH: reason`) unless `path` can be written (created if missing):
    checked before the work whose result it would hold."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a directory")
    parent = path.parent
    if not parent.is_dir():
        raise UserError(f"{flag} {path}: no directory {parent}")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UserError(f"{flag} {path}: not writable")


def cache_root() -> Path:
    """Where saestream caches what it builds (model copies, compiled kernels):
    `$SAESTREAM_CACHE`, else `~/.cache/saestream`."""
    root = os.environ.get("SAESTREAM_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "saestream"
