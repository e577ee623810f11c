"""Where a store lives: a local folder, or any URI ``pyarrow.fs.FileSystem.from_uri`` accepts.

``s3://bucket/prefix`` (options in the query string, e.g. ``?endpoint_override=host:port&scheme=http``;
credentials from the usual ``AWS_*`` environment variables), ``gs://bucket/prefix``, ``hdfs://...`` and
``file://`` URIs work; anything without ``scheme://`` is a local path.

Publishing is atomic on both: a local file is written to a temp file in its folder and renamed; an
object is written with one PUT (or a multipart upload that completes at once), so it appears whole
or not at all. pyarrow is imported lazily so that ``import sae_core`` stays light.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")
_CHUNK = 8 << 20


def is_uri(location: str | Path) -> bool:
    """True for ``scheme://...`` (object storage, ``file://``), False for a plain local path."""
    return isinstance(location, str) and bool(_URI.match(location))


@dataclass(frozen=True)
class Location:
    """A folder on some filesystem: ``fs`` is a ``pyarrow.fs.FileSystem``, ``path`` the folder on it."""

    fs: Any
    """The pyarrow filesystem (LocalFileSystem for local paths)."""
    path: str
    """The folder's path on ``fs`` (for S3: ``bucket/prefix``), without a trailing slash."""
    display: str
    """The folder as the user named it, for messages."""
    local: bool
    """True when ``path`` is a folder of this machine (temp file + rename are available)."""

    def join(self, name: str) -> str:
        return f"{self.path}/{name}" if self.path else name

    def exists(self, name: str) -> bool:
        import pyarrow.fs as pafs

        return self.fs.get_file_info(self.join(name)).type == pafs.FileType.File

    def read_bytes(self, name: str) -> bytes:
        with self.fs.open_input_stream(self.join(name)) as fh:
            return fh.read()

    def makedirs(self) -> None:
        if self.local:
            Path(self.path).mkdir(parents=True, exist_ok=True)
        else:
            self.fs.create_dir(self.path, recursive=True)

    def write_bytes(self, name: str, data: bytes) -> None:
        """Publish ``data`` as ``name`` atomically (temp file + rename locally, one PUT on object storage)."""
        if self.local:
            atomic_write_local(Path(self.join(name)), data)
        else:
            with self.fs.open_output_stream(self.join(name)) as fh:
                fh.write(data)

    def publish_file(self, local_file: str, name: str) -> None:
        """Move a finished local file to ``name``: a rename locally, a streamed upload otherwise."""
        if self.local:
            os.replace(local_file, self.join(name))
            return
        with open(local_file, "rb") as src, self.fs.open_output_stream(self.join(name)) as dst:
            shutil.copyfileobj(src, dst, _CHUNK)

    def scratch_file(self, name: str) -> str:
        """A fresh temp file to write ``name`` into before :meth:`publish_file`: in the same folder
        locally (so the rename is atomic), in the system temp folder for object storage."""
        folder = self.path if self.local else None
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
        os.close(fd)
        return tmp

    def sha256(self, name: str) -> str:
        digest = hashlib.sha256()
        with self.fs.open_input_stream(self.join(name)) as fh:
            while chunk := fh.read(_CHUNK):
                digest.update(chunk)
        return digest.hexdigest()

    def remove_stale(self, pattern: str) -> None:
        """Delete leftovers of a killed local writer (temp files matching ``pattern``); object storage has none."""
        if self.local and Path(self.path).is_dir():
            for stale in Path(self.path).glob(pattern):
                stale.unlink(missing_ok=True)


def atomic_write_local(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder, fsync and a rename (the umask's
    mode, the folder fsynced: sae_core.publish)."""
    from sae_core.publish import atomic_write_bytes

    atomic_write_bytes(path, data)


def resolve(location: str | Path) -> Location:
    """The filesystem and folder path of a local path or a URI; raises ValueError for a URI pyarrow rejects."""
    import pyarrow.fs as pafs

    if not is_uri(location):
        path = os.path.abspath(os.path.expanduser(str(location)))
        return Location(fs=pafs.LocalFileSystem(), path=path, display=str(location), local=True)
    try:
        fs, path = pafs.FileSystem.from_uri(str(location))
    except (ValueError, OSError) as exc:  # pyarrow's ArrowInvalid / ArrowIOError derive from these
        raise ValueError(f"cannot open {location!r}: {exc}") from exc
    local = isinstance(fs, pafs.LocalFileSystem)
    return Location(fs=fs, path=path.rstrip("/"), display=str(location), local=local)
