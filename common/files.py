"""Directories the commands write to, checked before any work that would be lost; files
they read that someone else may have put there, opened without ever blocking."""

from __future__ import annotations

import fcntl
import logging
import os
import stat
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from saestream.common.errors import UserError, escaped

log = logging.getLogger("saestream.files")


def check_writable_dir(path: Path, flag: str) -> None:
    """UserError (`FLAG PATH: not writable (reason)`) unless `path` exists, or can be made,
    as a directory where a file can be written and synced: checked at start-up, so a
    read-only, full or misnamed directory costs no training time. A path that is not UTF-8
    is refused too: safetensors cannot open files under it, so what was written there could
    not be read back."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f"{flag} {escaped(str(path))}: not a UTF-8 path (safetensors files "
                        "under it could not be read back)") from None
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
    checked before the work whose result it would hold. Only a regular file (or a link to
    one) is written over: a file is written by renaming a new one onto its name, which for
    root would replace a device (`--out /dev/null`) with a file, and appending to a FIFO
    waits for a reader forever."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as exc:  # a name too long, a loop of links, a parent not a folder
        raise UserError(f"{flag} {escaped(str(path))}: not writable "
                        f"({exc.strerror or exc})") from None
    if mode is not None and stat.S_ISDIR(mode):
        raise UserError(f"{flag} {path}: is a directory")
    if mode is not None and not stat.S_ISREG(mode):
        raise UserError(f"{flag} {path}: not a regular file ({file_kind(mode)}): name a file "
                        "to write")
    parent = path.parent
    if not parent.is_dir():
        raise UserError(f"{flag} {path}: no directory {parent}")
    if not os.access(parent, os.W_OK) or (mode is not None and not os.access(path, os.W_OK)):
        raise UserError(f"{flag} {path}: not writable")


def cache_root() -> Path:
    """Where saestream caches what it builds (model copies, compiled kernels):
    `$SAESTREAM_CACHE` (`~` expanded: environment files set it unexpanded), else
    `~/.cache/saestream`. UserError when it names something that is not a folder, which
    every use would otherwise trip over in its own way."""
    raw = os.environ.get("SAESTREAM_CACHE", "")
    if not raw.strip():
        return Path.home() / ".cache" / "saestream"
    root = Path(raw).expanduser()
    if os.path.exists(root) and not os.path.isdir(root):  # neither raises, for any path
        raise UserError(f"SAESTREAM_CACHE={raw[:200]!r}: not a folder (name a folder, or one "
                        "to be made, or leave it unset for ~/.cache/saestream)")
    return root


class NotRegularFile(OSError):
    """A path that should be a file and is a FIFO, a device, a socket or a directory."""

    def __init__(self, path: Path | str, mode: int) -> None:
        self.kind = file_kind(mode)
        super().__init__(f"{path}: not a regular file ({self.kind})")


class FileTooLarge(OSError):
    """A file longer than its reader's limit: not one of the small files it expects."""


def file_kind(mode: int) -> str:
    """What a non-regular `st_mode` is, for messages: "a FIFO", "a directory", ..."""
    for test, kind in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a file"


def open_regular(path: Path | str) -> int:
    """A (blocking) read descriptor of `path`, through symlinks, if it is a regular file;
    NotRegularFile if not, else OSError as open(2) gives it.

    Opened non-blocking and checked on the descriptor: open() of a FIFO put where a file
    should be waits for a writer forever (SIGTERM unheard), a device may never reach EOF,
    and checking the path first alone leaves a race. The first stat names a socket, which
    cannot be opened at all."""
    if not stat.S_ISREG(mode := os.stat(path).st_mode):
        raise NotRegularFile(path, mode)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(mode := os.fstat(fd).st_mode):  # swapped since the stat
            raise NotRegularFile(path, mode)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path: Path | str, limit: int) -> bytes:
    """The whole of a regular file of at most `limit` bytes (`open_regular`); FileTooLarge
    beyond, so a hostile file cannot make its reader allocate without bound."""
    fd = open_regular(path)
    try:
        if (size := os.fstat(fd).st_size) > limit:
            raise FileTooLarge(f"{path}: {size:,} bytes, more than the {limit:,} such a file "
                               "may have")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:  # grew since the fstat
        raise FileTooLarge(f"{path}: more than the {limit:,} bytes such a file may have")
    return data


class UnsafeArchive(ValueError):
    """A torch.save file that torch.load could be made to inflate beyond its own size."""


def check_torch_archive(path: Path | str) -> None:
    """UnsafeArchive unless `path` is a zip archive (torch.save's format since torch 1.6)
    whose entries are all stored, not compressed, with sizes within the file.

    torch.load allocates each storage at the size the archive states and inflates it before
    any caller can check a shape, so a few compressed megabytes could ask for gigabytes (and
    the legacy, non-zip format allocates what its pickle says before reading). torch.save
    never compresses, so this refuses no file it wrote."""
    fd = open_regular(path)
    try:
        with os.fdopen(fd, "rb", closefd=False) as fh:
            if not zipfile.is_zipfile(fh):
                raise UnsafeArchive(f"{path}: not a torch.save zip archive")
            fh.seek(0)
            size = os.fstat(fd).st_size
            with zipfile.ZipFile(fh) as archive:
                for info in archive.infolist():
                    if info.compress_type != zipfile.ZIP_STORED or \
                            info.file_size != info.compress_size or info.file_size > size:
                        raise UnsafeArchive(f"{path}: entry {info.filename!r} is compressed "
                                            "(torch.save stores every entry as it is)")
    except zipfile.BadZipFile as exc:
        raise UnsafeArchive(f"{path}: not a readable zip archive ({exc})") from None
    finally:
        os.close(fd)
