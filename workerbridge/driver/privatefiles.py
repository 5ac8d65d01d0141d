"""Files only their owner may touch: the per-user directory and the Gateway's log.

Covers: making or checking a per-user 0700 directory, opening a file for append
(0600, never through a symlink, owned by us) and opening a file to read only
when this user owns it.  Every check is on the opened descriptor (``fstat``) or
an ``lstat``, so a planted symlink or another user's file is refused, never used.
Does not cover: the runtime directory on executors (``_bootstrap``).
"""

from __future__ import annotations

import errno
import os
import stat


class NotPrivateError(OSError):
    """A path that is not ours alone: a symlink, another user's, or open to others."""


def user_dir(base: str) -> str:
    """``<base>/workerbridge-<uid>``: created 0700, or refused if it is not ours and private."""
    path = os.path.join(base, f"workerbridge-{os.getuid()}")
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise NotPrivateError(f"{path} is not a directory (a symlink or a file put there)")
    _check_owner_and_mode(path, st)
    return path


def open_append(path: str):
    """``path`` opened for appending text: created 0600, no symlink, ours, no one else's bits."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotPrivateError(f"{path} is not a regular file")
        _check_owner_and_mode(path, st)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "a", encoding="utf-8", buffering=1)


def open_owned(path: str, mode: str = "r"):
    """``path`` opened to read only if it is a regular file this user owns (no symlink)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        if e.errno == errno.ELOOP:                 # the last part is a symlink
            raise NotPrivateError(f"{path} is a symlink; refused") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotPrivateError(f"{path} is not a regular file; refused")
        if st.st_uid != os.getuid():
            raise NotPrivateError(f"{path} belongs to uid {st.st_uid}, not to you "
                                  f"(uid {os.getuid()}); refused")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, mode, encoding="utf-8", errors="replace")


def _check_owner_and_mode(path: str, st: os.stat_result) -> None:
    if st.st_uid != os.getuid():
        raise NotPrivateError(f"{path} belongs to uid {st.st_uid}, not to us (uid {os.getuid()})")
    if st.st_mode & 0o077:
        raise NotPrivateError(f"{path} is open to others (mode {stat.S_IMODE(st.st_mode):o}); "
                              "it must be 0700 (directory) or 0600 (file)")
