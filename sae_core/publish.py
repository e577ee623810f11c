"""Publishing files so that readers see either the old state or the complete new one, never a mix.

Everything is written and fsynced under a temp name in the destination's folder, then renamed (the
rename is atomic within one file system), then the folder is fsynced so the rename survives a power
loss. Published files get the mode a plain ``open`` would give them (0666 minus the umask), not
``mkstemp``'s 0600, so results on a shared volume are readable by others.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def umask() -> int:
    """The process umask, read without changing it where /proc allows (changing it races other threads)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` in one rename (temp file in the same folder, fsynced, umask mode)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fchmod(fh.fileno(), 0o666 & ~umask())
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if not hasattr(libc, "renameat2"):
        return False
    return libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _temp_siblings(path: Path) -> list[Path]:
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(tmp|old)-")
    return [p for p in path.parent.iterdir() if pattern.match(p.name)]


def publish_folder(path: str | Path, files: dict[str, bytes], *, replaced: Iterable[str], commit: str) -> Path:
    """Publish ``files`` (name -> bytes) as the folder ``path``. The caller holds ``path``'s lock.

    ``commit`` names the file whose presence marks the folder complete: it is removed first and
    published last. ``replaced`` names files of an earlier publication that must not survive beside the
    new files, removed in that order. If ``path`` holds nothing else, old and new folders are swapped atomically (the old one
    is then removed); otherwise the folder's other entries stay where they are and only the files are
    replaced, ``commit`` last. Temp folders of earlier crashed publications are removed first.
    """
    path = Path(path).resolve()
    bad = [name for name in files if not name or "/" in name or name in (".", "..")]
    if bad or commit not in files:
        raise ValueError(f"publish_folder: bad file names {bad} or commit {commit!r} not among {sorted(files)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in _temp_siblings(path):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        os.chmod(tmp, 0o777 & ~umask())
        for name, data in files.items():
            _write_synced(tmp / name, data)
        fsync_dir(tmp)
        if not path.exists():
            os.rename(tmp, path)
        elif set(os.listdir(path)) <= {*replaced, *files}:
            _swap_folders(tmp, path)
        else:
            _replace_in_place(tmp, path, files, replaced=replaced, commit=commit)
        fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _swap_folders(new: Path, path: Path) -> None:
    """``path`` becomes ``new``; the old folder ends under ``new``'s name and is removed by the caller."""
    if _exchange(new, path):
        return
    aside = path.parent / f".{path.name}.old-{os.getpid()}"
    os.rename(path, aside)
    os.rename(new, path)
    shutil.rmtree(aside, ignore_errors=True)


def _replace_in_place(tmp: Path, path: Path, files: dict[str, bytes], *, replaced: Iterable[str],
                      commit: str) -> None:
    (path / commit).unlink(missing_ok=True)
    fsync_dir(path)
    for name in replaced:  # in the caller's order; the new files themselves are renamed over the old
        if name != commit and name not in files and ((path / name).is_file() or (path / name).is_symlink()):
            (path / name).unlink()
    for name in files:
        if name != commit:
            os.rename(tmp / name, path / name)
    fsync_dir(path)  # every other file is in place before the folder is marked complete
    os.rename(tmp / commit, path / commit)
    fsync_dir(path)
