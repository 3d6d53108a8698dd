"""Object store backend on a local directory (``file://``), with the operating system's
own calls.

The embedded default writes and reads a few small files for every table of every sync
(a page planning read, a chunk's batch file, the transform's read of it): in the calling
thread, each costs a system call or two. Writes are atomic, as on S3: the data goes to a
staging file beside the key's (a name with ``#``, never listed), then is renamed over the
key, or, for a create-only write, hard-linked to it (which fails if the key exists).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlparse

from canonflow.errors import ConfigError, InvalidIdentifier, StoreUnavailable
from canonflow.stores.object_store import ObjectInfo, ObjectStoreCapabilities

STAGING = "#"  # in a file's name: a write in progress (or one a crash left), never an object


def local_root(url: str) -> Path:
    """``file://./data`` (relative) and ``file:///abs/data`` both name a directory."""
    parsed = urlparse(url)
    raw = (parsed.netloc + parsed.path) if parsed.netloc else parsed.path
    if not raw:
        raise ConfigError(f"object store URL {url!r} names no directory")
    return Path(raw).expanduser().resolve()


class LocalObjectStore:
    def __init__(self, url: str) -> None:
        self.url = url
        self._root = local_root(url)
        try:
            self._root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"object store {url!r}: cannot create its directory: "
                              f"{exc.strerror}") from None
        self.capabilities = ObjectStoreCapabilities(create_only_writes=True,
                                                    shared_between_processes=True)

    def _path(self, key: str) -> Path:
        parts = key.split("/")
        if not key or key.startswith("/") or any(p in ("", ".", "..") or STAGING in p
                                                 for p in parts):
            raise InvalidIdentifier(f"invalid object key {key!r}")
        return self._root.joinpath(*parts)

    def put(self, key: str, data: bytes, *, create_only: bool = False) -> None:
        path = self._path(key)
        staged = path.with_name(f"{path.name}{STAGING}{os.getpid()}-{threading.get_ident()}")
        try:
            try:
                staged.write_bytes(data)
            except FileNotFoundError:  # the key's folder is new
                path.parent.mkdir(parents=True, exist_ok=True)
                staged.write_bytes(data)
            if not create_only:
                os.replace(staged, path)
                return
            try:
                os.link(staged, path)
            except FileExistsError:
                raise FileExistsError(key) from None
            finally:
                staged.unlink(missing_ok=True)
        except FileExistsError:
            raise
        except OSError as exc:
            staged.unlink(missing_ok=True)
            raise StoreUnavailable(f"cannot write {key}: {exc.strerror or exc}") from exc

    def get(self, key: str) -> bytes:
        return self.get_object(key)[0]

    def get_object(self, key: str) -> tuple[bytes, datetime]:
        try:
            with open(self._path(key), "rb") as f:
                modified = os.fstat(f.fileno()).st_mtime
                return f.read(), datetime.fromtimestamp(modified, UTC)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise FileNotFoundError(key) from None
        except OSError as exc:
            raise StoreUnavailable(f"cannot read {key}: {exc.strerror or exc}") from exc

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Keys under ``prefix``, depth first, by name."""
        folder = prefix.rstrip("/").rpartition("/")[0] if not prefix.endswith("/") else prefix
        base = self._root.joinpath(*[p for p in folder.split("/") if p])
        yield from (info for info in self._walk(base, base.relative_to(self._root).as_posix())
                    if info.key.startswith(prefix))

    def _walk(self, folder: Path, key_prefix: str) -> Iterator[ObjectInfo]:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as exc:
            raise StoreUnavailable(f"cannot list {key_prefix or '/'}: "
                                   f"{exc.strerror or exc}") from exc
        for entry in entries:
            if STAGING in entry.name:
                continue
            key = f"{key_prefix}/{entry.name}" if key_prefix not in ("", ".") else entry.name
            if entry.is_dir(follow_symlinks=False):
                yield from self._walk(Path(entry.path), key)
            elif entry.is_file():
                try:
                    stat = entry.stat()
                except FileNotFoundError:  # removed meanwhile
                    continue
                yield ObjectInfo(key, stat.st_size, datetime.fromtimestamp(stat.st_mtime, UTC))

    def delta_uri(self, name: str) -> tuple[str, dict[str, str]]:
        return os.fspath(self._root / name), {}


def open_local(url: str) -> LocalObjectStore:
    return LocalObjectStore(url)
