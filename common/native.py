"""Small C libraries compiled on first use and loaded with ctypes: the consumer's CPU kernels
(`consumer/cpu_kernels.c`) and the wire format's byte regrouping (`common/wire_kernels.c`).

Why C at all: a few passes over memory that numpy and torch can only do in several passes
(the SAE step's top-k, the lz4-shuffle byte planes) run in one (BENCHMARKS.md). ctypes
releases the GIL for the call, so other threads run meanwhile.

A library is built with the system C compiler ($CC, else `cc`; about a second) into a cache
folder ($SAESTREAM_CACHE/kernels, else ~/.cache/saestream/kernels, else
$TMPDIR/saestream-kernels-<uid>; failing all three, a fresh private folder used once), keyed
by the source, the flags and this CPU, and renamed into place atomically, so concurrent
processes share one build. A shared object is code, and loading one another user could have
placed would run theirs: a folder is used only if it is a real folder this user owns and no
one else may write, the build only if it is a regular file of ours, and both are reached and
loaded through the descriptors that were checked (no path is looked up twice). A cached build
that does not load is built again. With no compiler, a failed build, or SAESTREAM_NATIVE=0,
`load()` returns None (with one warning for a failure) and callers use their pure-Python
path (torch or numpy): the same results, slower.
"""

from __future__ import annotations

import _ctypes
import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from saestream.common.errors import UserError
from saestream.common.files import cache_root

log = logging.getLogger(__name__)

ENV = "SAESTREAM_NATIVE"
"""0/false/no/off: no C library is built or loaded (1/true/yes/on, empty or unset: they are)."""
_OFF = frozenset({"0", "false", "no", "off"})
_ON = frozenset({"1", "true", "yes", "on"})
_COMPILE_TIMEOUT_S = 60


class _CompileError(Exception):
    """The compiler failed with these flags (another folder would not help)."""


def switch(name: str, default: bool = True) -> bool:
    """An on/off environment variable: unset or empty is `default`, 0/false/no/off and
    1/true/yes/on (any case) say so; UserError for anything else, since a typo
    (`SAESTREAM_NATIVE=of`) would otherwise mean whichever way the code leans."""
    raw = os.environ.get(name, "")
    value = raw.strip().lower()
    if not value:
        return default
    if value in _OFF or value in _ON:
        return value in _ON
    raise UserError(f"{name}={raw[:40]!r}: not on or off (use 0/false/no/off or "
                    "1/true/yes/on, or leave it unset)")


def enabled() -> bool:
    """False when SAESTREAM_NATIVE is 0/false/no/off (the pure-Python paths then run);
    UserError for a value that is neither on nor off (`switch`)."""
    return switch(ENV)


_bad_switch_logged: list[str] = []


def _enabled_here() -> bool:
    """`enabled()` for `load()`. On the main thread a bad value raises (commands read it at
    start-up, by `load_kernels` and the like, and print one line); on another thread, where
    nothing would turn it into that line (an encode or decode pool reading it first), it is
    one error in the log and the pure-Python paths, which give the same results."""
    try:
        return enabled()
    except UserError as exc:
        if threading.current_thread() is threading.main_thread():
            raise
        if str(exc) not in _bad_switch_logged:
            _bad_switch_logged.append(str(exc))
            log.error("%s: C kernels off", exc)
        return False


class NativeLibrary:
    """One C source, built and loaded once per process on first `load()`.

    :param source: the C file (shipped in the wheel beside its Python module).
    :param flag_sets: compiler flags to try in order (the first that compiles wins).
    :param bind: declares the symbols' argument and result types; raises AttributeError
        when a symbol is missing (then a cached build is not ours and is built again).
    :param what: what the library is, for log lines ("CPU kernels").
    :param fallback: what runs without it, for the one warning ("torch ops").
    """

    def __init__(
        self,
        source: Path,
        flag_sets: Sequence[Sequence[str]],
        bind: Callable[[ctypes.CDLL], ctypes.CDLL],
        *,
        what: str,
        fallback: str,
    ) -> None:
        self.source = source
        self.flag_sets = [list(f) for f in flag_sets]
        self.bind = bind
        self.what = what
        self.fallback = fallback
        self._lock = threading.Lock()
        self._loaded = False
        self._lib: ctypes.CDLL | None = None
        self._fd: int | None = None  # the loaded build's descriptor (`_open_built`)
        self.path: Path | None = None
        """Where the loaded build lives (None before `load()` or without one); for logs."""

    def load(self) -> ctypes.CDLL | None:
        """The compiled library, building it on first call; None where it cannot be had.
        UserError (on the main thread) for a SAESTREAM_NATIVE that is neither on nor off."""
        if not _enabled_here():
            return None
        if self._loaded:
            return self._lib
        with self._lock:
            if not self._loaded:
                try:
                    self._lib = self._build_and_load()
                except Exception as exc:  # e.g. no home folder, no temp folder, no source
                    log.warning("%s not built, falling back to %s: %s: %s", self.what,
                                self.fallback, type(exc).__name__, exc)  # fmt: skip
                    self._lib = None
                self._loaded = True
            return self._lib

    def _build_and_load(self) -> ctypes.CDLL | None:
        if sys.platform != "linux":  # the checks below need O_NOFOLLOW, dir_fd and /proc
            log.info("%s are built on Linux only: %s run instead", self.what, self.fallback)
            return None
        cc = shlex.split(os.environ.get("CC") or "cc")
        if not cc or shutil.which(cc[0]) is None:
            log.warning("no C compiler (%s) found: %s fall back to %s", " ".join(cc), self.what,
                        self.fallback)  # fmt: skip
            return None
        source, cpu = self.source.read_bytes(), _cpu_tag()
        errors: list[str] = []
        # Cache folders first; last, a fresh private folder of our own, used once and removed.
        for folder in [*_cache_dirs(), None]:
            scratch = None
            try:
                if folder is None:
                    folder = scratch = Path(tempfile.mkdtemp(prefix="saestream-kernels-"))
                dfd = _open_private_dir(folder)
            except OSError as exc:
                errors.append(f"{folder}: {exc}")
                if scratch is not None:
                    shutil.rmtree(scratch, ignore_errors=True)
                continue
            try:
                for flags in self.flag_sets:
                    key = hashlib.sha256(source + " ".join([*cc, *flags, cpu]).encode())
                    name = f"{self.source.stem}-{key.hexdigest()[:20]}.so"
                    try:
                        lib = self._load_or_build(dfd, name, cc, flags)
                    except _CompileError as exc:
                        errors.append(f"{' '.join(cc + flags)}: {exc}")
                        continue
                    self.path = folder / name
                    return lib
                break  # the compiler fails with every flag set: another folder would not help
            except OSError as exc:  # the folder: read-only, full, ...
                errors.append(f"{folder}: {exc}")
            finally:
                os.close(dfd)
                if scratch is not None:
                    shutil.rmtree(scratch, ignore_errors=True)  # what is loaded stays mapped
        log.warning("%s not built, falling back to %s: %s", self.what, self.fallback,
                    "; ".join(errors))  # fmt: skip
        return None

    def _load_or_build(
        self, dfd: int, name: str, cc: list[str], flags: list[str]
    ) -> ctypes.CDLL:
        try:
            lib = self._open_built(dfd, name)
        except (OSError, AttributeError) as exc:  # not ours, truncated, not our symbols, ...
            log.warning("cached %s %s unusable (%s): building them again", self.what, name, exc)
            os.unlink(name, dir_fd=dfd)
            lib = None
        if lib is None:
            _compile(cc, flags, self.source, dfd, name)
            lib = self._open_built(dfd, name)
            if lib is None:
                raise OSError(f"{name} vanished after it was built")
        return lib

    def _open_built(self, dfd: int, name: str) -> ctypes.CDLL | None:
        """The build `name` in the folder `dfd`, or None if there is none. OSError if it is
        not a regular file of ours that no one else may write; it is loaded through the very
        descriptor that was checked (/proc/self/fd), so it cannot be swapped in between.

        The descriptor of a loaded build stays open for good: dlopen hands back whatever
        object it loaded under the same path name, and /proc/self/fd/N names another file
        once N is reused, e.g. by the next library's load."""
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        except FileNotFoundError:
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
                raise OSError(f"{name} is not a private regular file of this user")
            lib = ctypes.CDLL(f"/proc/self/fd/{fd}")
            try:
                lib = self.bind(lib)
            except AttributeError:  # not our library: unload it, or the next dlopen of the
                _ctypes.dlclose(lib._handle)  # same /proc path would be handed it again
                raise
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return lib


def _cache_dirs() -> list[Path]:
    """Where a build may be cached, in order of preference (a folder that cannot even be
    named, e.g. a home folder of a user with no passwd entry, is left out)."""
    dirs = []
    for where in (lambda: cache_root() / "kernels",
                  lambda: Path(tempfile.gettempdir()) / f"saestream-kernels-{os.getuid()}"):
        try:
            dirs.append(where())
        except (OSError, RuntimeError, KeyError):
            pass
        except UserError as exc:  # a bad $SAESTREAM_CACHE: say so, and build elsewhere
            log.warning("%s: C kernels built elsewhere", exc)
    return dirs


def _open_private_dir(folder: Path) -> int:
    """A descriptor of `folder` (made 0700 if missing); OSError unless it is a real folder
    (not a symlink) that this user owns and no one else may write. Everything after goes
    through the descriptor, so renaming or replacing the path afterwards changes nothing."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    st = os.fstat(fd)
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        os.close(fd)
        raise OSError(f"{folder} is not private to this user (owner, or group/other write)")
    return fd


def _cpu_tag() -> str:
    """What -march=native depends on: a build for one CPU may not run on another."""
    tag = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags", "Features")):
                tag += line
                if line.startswith(("flags", "Features")):
                    break
    except OSError:
        pass
    return tag


def _compile(cc: list[str], flags: list[str], source: Path, dfd: int, name: str) -> None:
    """Compile in a fresh private temporary folder, then copy into the cache folder `dfd`
    under a unique name and rename it into place (atomic: concurrent builders all succeed,
    and a reader sees a whole file or none)."""
    with tempfile.TemporaryDirectory(prefix="saestream-cc-") as work:
        out = os.path.join(work, name)
        try:
            proc = subprocess.run(
                [*cc, *flags, "-o", out, str(source)],
                capture_output=True,
                text=True,
                timeout=_COMPILE_TIMEOUT_S,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise _CompileError(str(exc)) from None
        if proc.returncode != 0:
            lines = proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"]
            raise _CompileError(lines[-1])
        data = Path(out).read_bytes()
    tmp = f".{name}.{os.getpid()}.{threading.get_ident()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                 dir_fd=dfd)  # fmt: skip
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dfd)
        raise
