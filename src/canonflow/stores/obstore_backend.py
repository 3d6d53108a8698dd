"""Object store backend on obstore (Rust object_store): local files, memory and S3.

``s3://bucket/prefix?endpoint=http://127.0.0.1:9000&region=us-east-1`` names any
S3-compatible server; credentials come from the standard AWS environment variables (or the
instance/web-identity chain), never from the URL. Create-only writes use ``If-None-Match``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import obstore
from obstore.exceptions import AlreadyExistsError, BaseError
from obstore.store import LocalStore, MemoryStore, S3Store

from canonflow.errors import ConfigError, InvalidIdentifier, StoreUnavailable
from canonflow.stores.object_store import ObjectInfo, ObjectStoreCapabilities

_DELETE_BATCH = 1000  # keys a delete request names (S3's DeleteObjects limit)
_KEPT_FOLDERS = 4  # {kind}/{tenant}/{service}/{table}: a delete leaves these folders


def local_root(url: str) -> Path:
    """``file://./data`` (relative) and ``file:///abs/data`` both name a directory."""
    parsed = urlparse(url)
    raw = (parsed.netloc + parsed.path) if parsed.netloc else parsed.path
    if not raw:
        raise ConfigError(f"object store URL {url!r} names no directory")
    return Path(raw).expanduser().resolve()


class ObstoreObjectStore:
    def __init__(self, url: str) -> None:
        self.url = url
        self._root: Path | None = None
        self._s3: tuple[str, dict[str, str]] | None = None
        if url.startswith("memory://"):
            self._store: LocalStore | MemoryStore | S3Store = MemoryStore()
            self.capabilities = ObjectStoreCapabilities(
                create_only_writes=True, shared_between_processes=False
            )
        elif url.startswith("s3://"):
            self._store, self._s3 = _open_s3(url)
            self.capabilities = ObjectStoreCapabilities(
                create_only_writes=True, shared_between_processes=True
            )
        else:
            self._root = local_root(url)
            self._root.mkdir(parents=True, exist_ok=True)
            self._store = LocalStore(str(self._root))
            self.capabilities = ObjectStoreCapabilities(
                create_only_writes=True, shared_between_processes=True
            )

    def put(self, key: str, data: bytes, *, create_only: bool = False) -> None:
        try:
            obstore.put(self._store, key, data, mode="create" if create_only else "overwrite")
        except AlreadyExistsError as exc:
            raise FileExistsError(key) from exc
        except ValueError:  # obstore's word for a key it cannot parse
            raise InvalidIdentifier(f"invalid object key {key!r}") from None
        except BaseError as exc:
            raise StoreUnavailable(f"cannot write {key}: {type(exc).__name__}") from exc

    def get(self, key: str) -> bytes:
        return self.get_object(key)[0]

    def get_object(self, key: str) -> tuple[bytes, datetime]:
        try:
            result = obstore.get(self._store, key)
            return bytes(result.bytes()), result.meta["last_modified"]
        except FileNotFoundError:
            raise FileNotFoundError(key) from None
        except ValueError:
            raise InvalidIdentifier(f"invalid object key {key!r}") from None
        except BaseError as exc:
            raise StoreUnavailable(f"cannot read {key}: {type(exc).__name__}") from exc

    def exists(self, key: str) -> bool:
        try:
            obstore.head(self._store, key)
        except FileNotFoundError:
            return False
        return True

    def delete(self, keys: Iterable[str]) -> None:
        """In a local store, the job and chunk folders (``{kind}/{tenant}/{service}/{table}/
        {job}/{chunk}/``) the deleted objects leave empty go too; never the folders above
        them, which a new job of the same table may be writing into."""
        batch = list(keys)
        for start in range(0, len(batch), _DELETE_BATCH):
            part = batch[start:start + _DELETE_BATCH]
            try:
                obstore.delete(self._store, part)
            except FileNotFoundError:  # a local store refuses the batch: one at a time
                for key in part:
                    with contextlib.suppress(FileNotFoundError):
                        self._delete(key)
            except (ValueError, TypeError):  # (a list with a key obstore cannot parse)
                raise InvalidIdentifier(f"invalid object key among {part[:3]!r}") from None
            except BaseError as exc:
                raise StoreUnavailable(f"cannot delete {part[0]}...: "
                                       f"{type(exc).__name__}") from exc
        if self._root is not None:
            for folder in sorted({os.path.dirname(k) for k in batch}, reverse=True):
                parts = folder.split("/")
                while len(parts) > _KEPT_FOLDERS:
                    try:
                        (self._root / "/".join(parts)).rmdir()
                    except OSError:  # not empty (or gone): the folders above stay too
                        break
                    parts.pop()

    def _delete(self, key: str) -> None:
        try:
            obstore.delete(self._store, key)
        except (ValueError, TypeError):
            raise InvalidIdentifier(f"invalid object key {key!r}") from None
        except BaseError as exc:
            raise StoreUnavailable(f"cannot delete {key}: {type(exc).__name__}") from exc

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        if self._root is not None and not (self._root / prefix).parent.exists():
            return
        try:
            for batch in obstore.list(self._store, prefix=prefix.rstrip("/")):
                for meta in batch:
                    key = str(meta["path"])
                    if key.startswith(prefix):
                        yield ObjectInfo(key, int(meta["size"]), meta["last_modified"])
        except FileNotFoundError:
            return
        except BaseError as exc:
            raise StoreUnavailable(f"cannot list {prefix}: {type(exc).__name__}") from exc

    def delta_uri(self, name: str) -> tuple[str, dict[str, str]]:
        if self._s3 is not None:
            base, options = self._s3
            return f"{base}/{name}", dict(options)
        if self._root is None:
            raise ConfigError(
                "canonical tables need a shared store: memory:// cannot hold Delta tables, "
                "set canonical_store to a file:// or s3:// URL"
            )
        return os.fspath(self._root / name), {}


def _open_s3(url: str) -> tuple[S3Store, tuple[str, dict[str, str]]]:
    parsed = urlparse(url)
    bucket, prefix = parsed.netloc, parsed.path.strip("/")
    if not bucket:
        raise ConfigError(f"object store URL {url.split('?')[0]!r} names no bucket")
    query = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
    unknown = set(query) - {"endpoint", "region"}
    if unknown:
        raise ConfigError(f"object store URL: unknown option(s) {sorted(unknown)}; "
                          "use endpoint= and region=")
    endpoint = query.get("endpoint") or os.environ.get("AWS_ENDPOINT_URL")
    region = query.get("region") or os.environ.get("AWS_REGION") or os.environ.get(
        "AWS_DEFAULT_REGION") or "us-east-1"
    kwargs: dict[str, object] = {"region": region, "conditional_put": "etag"}
    delta: dict[str, str] = {"AWS_REGION": region, "conditional_put": "etag"}
    if endpoint:
        kwargs["endpoint"] = endpoint
        delta["AWS_ENDPOINT_URL"] = endpoint
        if endpoint.startswith("http://"):
            kwargs["allow_http"] = True
            delta["AWS_ALLOW_HTTP"] = "true"
    store = S3Store(bucket, prefix=prefix or None, **kwargs)  # type: ignore[arg-type]
    base = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
    return store, (base, delta)


def open_obstore(url: str) -> ObstoreObjectStore:
    return ObstoreObjectStore(url)
