"""Files written where the user said (``-o``): a report, a ledger or platform export, a job file from ``init``.

Each is written to a temporary file beside its target and renamed over it, so that a half-written file never sits
where a person or a scheduler would open it. That pattern needs a regular file as its target: renamed over a
symlink, it would replace the link; over a device such as ``/dev/full`` (as root), the device node itself. So a
symlink is followed to the file it names, and any other target that exists and is not a regular file is refused.
Whatever the system refuses on the way (a read-only or full disk, a missing permission) is one
:class:`sync.errors.BadInputError` naming the path the user gave and the system's reason: exit 2, not a
traceback.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path

from sync.errors import BadInputError

__all__ = ["cannot_write", "keep_mode", "output_file", "replaced_atomically", "reserve_beside"]


def cannot_write(path: Path, exc: OSError) -> BadInputError:
    """The error for an output ``path`` the system would not let us write (``exc``, its reason)."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    return BadInputError(str(path), f"cannot write the file: {reason}")


def output_file(path: Path) -> Path:
    """The regular file to write for the output path ``path``: the file a symlink names, else ``path``.

    Raises :class:`BadInputError` when that file exists and is not a regular file (a directory, a device, a FIFO):
    nothing pushsync writes belongs there, and renaming a file over it would replace it.
    """
    # A dangling link resolves to the path it names: the file is created there, and the link then works.
    target = path.resolve() if path.is_symlink() else path
    try:
        mode = target.stat().st_mode
    except FileNotFoundError:
        return target
    except OSError as exc:
        raise cannot_write(path, exc) from exc
    if stat.S_ISDIR(mode):
        raise BadInputError(str(path), "is a directory; name a file to write (in it, say)")
    if not stat.S_ISREG(mode):
        raise BadInputError(
            str(path), "exists and is not a regular file (a device, a FIFO or a socket): name a file to write"
        )
    return target


def reserve_beside(target: Path, suffix: str) -> Path:
    """A new, empty file of the caller's own beside ``target``: ``<name>.<random><suffix>``.

    One shared ``<name><suffix>`` let two commands writing the same file (an hourly cron whose last run is still
    going) write into one temporary file: the first to finish renamed it into place while the other still wrote
    into it, so the file that looked complete mixed both. Created with ``O_EXCL``, not ``mkstemp``: the umask's
    mode (mkstemp's is 0600), as for any file the user writes."""
    while True:
        reserved = target.with_name(f"{target.name}.{secrets.token_hex(4)}{suffix}")
        try:
            os.close(os.open(reserved, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return reserved


def keep_mode(target: Path, written: Path) -> None:
    """Give ``written`` the permissions of the file ``target`` it will replace, as ``>`` or ``cp`` over a file
    keep them: a file of e-mails and phone numbers made private (``chmod 600``) must not come back readable by
    everyone (the umask's 644) when it is written again. A new file keeps the umask's."""
    try:
        mode = stat.S_IMODE(target.stat().st_mode)
    except FileNotFoundError:
        return
    os.chmod(written, mode)


@contextlib.contextmanager
def replaced_atomically(path: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path of the caller's own (:func:`reserve_beside`) to write, renamed over :func:`output_file`
    of ``path`` with that file's permissions (:func:`keep_mode`) when the block ends without error (removed when
    it fails). Its folders are made. An :class:`OSError` on the way — from the block too — is
    :func:`cannot_write` for ``path``."""
    target = output_file(path)
    tmp: Path | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = reserve_beside(target, suffix)
        yield tmp
        keep_mode(target, tmp)
        os.replace(tmp, target)
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise cannot_write(path, exc) from exc
        raise
