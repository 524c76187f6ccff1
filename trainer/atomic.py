"""Atomic writes: a temp file in the same folder, fsync, then rename, so a file is whole or untouched.

On Windows a rename onto a file that another process holds open (an antivirus scan, the app reading a caption, a
viewer showing an image) fails with PermissionError for as long as it is open; such a replace is retried for a few
seconds before it gives up with one line naming the file."""
from __future__ import annotations

import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


UMASK = _umask()  # once, at import: os.umask is process-wide and not thread-safe to poke at per write


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temp path beside `path`; on success it replaces `path`, on error it is removed.
    The result has the mode a plain write would give it (an existing file's, else 0666 less the umask),
    not mkstemp's private 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        try:
            mode = path.stat().st_mode & 0o777
        except OSError:
            mode = 0o666 & ~UMASK
        os.chmod(tmp, mode)
        replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError) and e.filename is None and e.errno is not None:  # a full disk names no file
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
        raise


WINDOWS = os.name == "nt"
REPLACE_TRIES = 40  # 0.05 s apart at first, then 0.25 s: about eight seconds in all


def replace(src: str | Path, dst: str | Path, windows: bool | None = None, sleep=time.sleep) -> None:
    """os.replace, retried while Windows says the target is in use by another process."""
    windows = WINDOWS if windows is None else windows
    for attempt in range(REPLACE_TRIES if windows else 1):
        try:
            os.replace(src, dst)
            return
        except PermissionError:
            if not windows:
                raise
            if attempt == REPLACE_TRIES - 1:
                raise PermissionError(f"{dst} is held open by another program (an editor, viewer or virus scan); "
                                      "close it and try again") from None
            sleep(0.05 if attempt < 10 else 0.25)


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)


def copy_file(src: str | Path, dst: str | Path) -> None:
    """A copy that is whole at `dst` or not there at all (a full disk leaves no half file under the name)."""
    import shutil

    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def fsync_dir(folder: Path) -> None:
    """The folder's entries (a rename, a new file) on disk too; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not possible on every platform; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
