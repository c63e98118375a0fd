"""One way to reach any storage URI: ``s3://bucket/key``, ``file:///path`` or a plain path.

S3 goes through s3fs with credentials from the standard AWS variables (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, profiles, instance roles). The endpoint of an
S3-compatible server comes from, in order: the explicit `endpoint_url` argument,
``BONEAUG_S3_ENDPOINT_URL``, ``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``; none means AWS.

Writes are atomic, so a reader never sees a half-written file under a final name: on S3 an
upload becomes visible whole when it completes (a failed write discards it); on a filesystem the
data goes to a temporary file beside the target and is then renamed over it. Run outputs are
published with a manifest written last (see `publish_manifest`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import IO, Any

import fsspec

from boneaug.errors import StorageError

ENDPOINT_VARS = ("BONEAUG_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
MANIFEST = "_MANIFEST.json"


def s3_endpoint(explicit: str | None = None) -> str | None:
    """The S3 endpoint URL in force (None means AWS's own)."""
    if explicit:
        return explicit
    for var in ENDPOINT_VARS:
        if os.environ.get(var):
            return os.environ[var]
    return None


def is_s3(uri: str) -> bool:
    return uri.startswith(("s3://", "s3a://"))


def _strip(uri: str) -> str:
    if is_s3(uri):
        return uri.split("://", 1)[1].rstrip("/")
    if uri.startswith("file://"):
        return str(Path(uri[len("file://"):]).absolute())
    if "://" in uri:
        raise StorageError(
            f"unsupported storage URI {uri!r}: use s3://bucket/key, file:///path or a plain path"
        )
    return str(Path(uri).absolute())


@lru_cache(maxsize=8)
def _s3fs(endpoint: str | None) -> fsspec.AbstractFileSystem:
    import s3fs

    kwargs: dict[str, Any] = {}
    if endpoint:
        kwargs["endpoint_url"] = endpoint
    # listings must see what this process just wrote
    return s3fs.S3FileSystem(client_kwargs=kwargs, use_listings_cache=False)


def filesystem(uri: str, *,
               endpoint_url: str | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for `uri`."""
    path = _strip(uri)
    if is_s3(uri):
        return _s3fs(s3_endpoint(endpoint_url)), path
    return fsspec.filesystem("file"), path


def pyarrow_filesystem(uri: str, *, endpoint_url: str | None = None) -> tuple[Any, str]:
    """(pyarrow.fs.FileSystem, path) for Ray Data and pyarrow readers/writers."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri, endpoint_url=endpoint_url)
    if is_s3(uri):
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path
    return pafs.LocalFileSystem(), path


def join(uri: str, *parts: str) -> str:
    """`uri` with path parts appended, keeping its scheme."""
    out = uri.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def to_uri(fs_path: str, like: str) -> str:
    """Turn a path inside `like`'s filesystem back into a URI of the same scheme."""
    if is_s3(like):
        return f"s3://{fs_path.lstrip('/')}" if not fs_path.startswith("s3://") else fs_path
    return fs_path


def exists(uri: str, *, endpoint_url: str | None = None) -> bool:
    fs, path = filesystem(uri, endpoint_url=endpoint_url)
    try:
        return bool(fs.exists(path))
    except Exception as exc:  # noqa: BLE001 - botocore errors are many; report them as one kind
        raise StorageError(f"cannot check {uri}: {exc}") from exc


def _one_request(uri: str) -> dict[str, Any]:
    """s3fs asks for an object's size (a HEAD) before every whole-object read, to fetch objects
    over 50 MB in concurrent ranges; one GET is half the requests for anything smaller."""
    return {"max_concurrency": 1} if is_s3(uri) else {}


def read_bytes(uri: str, *, endpoint_url: str | None = None) -> bytes:
    fs, path = filesystem(uri, endpoint_url=endpoint_url)
    try:
        return bytes(fs.cat_file(path, **_one_request(uri)))
    except FileNotFoundError as exc:
        raise StorageError(f"{uri} does not exist") from exc
    except Exception as exc:  # noqa: BLE001
        raise StorageError(f"cannot read {uri}: {exc}") from exc


def shard_name(first_key: str) -> str:
    """The file name of a shard that one task writes, from the first key it holds: a retried task
    rewrites its own file instead of adding a second one."""
    return hashlib.sha1(first_key.encode()).hexdigest()[:20] + ".parquet"


def read_many(uris: list[str], *, endpoint_url: str | None = None) -> list[bytes | StorageError]:
    """The bytes of each of `uris` (one filesystem), fetched concurrently where the filesystem
    can (s3fs: one request per object, in flight together); an object that cannot be read gives
    its StorageError in its place instead of failing the others."""
    if not uris:
        return []
    fs, _ = filesystem(uris[0], endpoint_url=endpoint_url)
    paths = [filesystem(u, endpoint_url=endpoint_url)[1] for u in uris]
    got = fs.cat(paths, on_error="return", **_one_request(uris[0]))

    def one(uri: str, data: Any) -> bytes | StorageError:
        if isinstance(data, FileNotFoundError):
            return StorageError(f"{uri} does not exist")
        if isinstance(data, BaseException):
            return StorageError(f"cannot read {uri}: {type(data).__name__}: {data}")
        return bytes(data)

    return [one(uri, got[p]) for uri, p in zip(uris, paths, strict=True)]


def read_ahead(uris: list[str], *, chunk: int = 8, endpoint_url: str | None = None
               ) -> Iterator[tuple[str, bytes | StorageError]]:
    """(uri, bytes or StorageError) for each of `uris` in order, as `read_many` gives them, while
    the next `chunk` objects are already being fetched on a background thread: the caller's work
    on one chunk overlaps the server's on the next."""
    chunks = [uris[i:i + chunk] for i in range(0, len(uris), chunk)]
    if not chunks:
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        fetching = pool.submit(read_many, chunks[0], endpoint_url=endpoint_url)
        for i, current in enumerate(chunks):
            got = fetching.result()
            if i + 1 < len(chunks):
                fetching = pool.submit(read_many, chunks[i + 1], endpoint_url=endpoint_url)
            yield from zip(current, got, strict=True)


def list_files(
    uri: str, *, suffix: str | None = None, endpoint_url: str | None = None
) -> list[str]:
    """Every file under `uri` (recursively), sorted, as URIs of the same scheme."""
    fs, path = filesystem(uri, endpoint_url=endpoint_url)
    try:
        found = fs.find(path) if fs.exists(path) else []
    except Exception as exc:  # noqa: BLE001
        raise StorageError(f"cannot list {uri}: {exc}") from exc
    names = sorted(p for p in found if suffix is None or p.lower().endswith(suffix.lower()))
    return [to_uri(p, uri) for p in names]


def remove(uri: str, *, endpoint_url: str | None = None) -> None:
    """Delete a file or a whole prefix; missing is fine."""
    fs, path = filesystem(uri, endpoint_url=endpoint_url)
    with contextlib.suppress(FileNotFoundError):
        if fs.exists(path):
            fs.rm(path, recursive=True)


def makedirs(uri: str, *, endpoint_url: str | None = None) -> None:
    fs, path = filesystem(uri, endpoint_url=endpoint_url)
    if not is_s3(uri):
        fs.makedirs(path, exist_ok=True)


def _tmp_sibling(path: str) -> str:
    head, _, name = path.rpartition("/")
    return f"{head}/.tmp-{uuid.uuid4().hex[:12]}-{name}"


@contextlib.contextmanager
def atomic_open(uri: str, *, endpoint_url: str | None = None) -> Iterator[IO[bytes]]:
    """Open `uri` for writing bytes; the final key appears only when the block exits cleanly.

    On S3 an upload is atomic by itself (a PUT, or a multipart upload's completion, makes the
    whole object visible at once), so it goes straight to its key and a failed block discards
    the buffer or aborts the upload; a copy from a temporary key would cost a HEAD, a server-side
    copy and a DELETE per file. On a filesystem the bytes go to a temporary sibling, renamed over
    the target at the end."""
    fs, path = filesystem(uri, endpoint_url=endpoint_url)
    if is_s3(uri):
        handle = fs.open(path, "wb")
        try:
            yield handle
        except BaseException:
            handle.discard()
            raise
        handle.close()
        return
    tmp = _tmp_sibling(path)
    fs.makedirs(path.rpartition("/")[0], exist_ok=True)
    try:
        with fs.open(tmp, "wb") as handle:
            yield handle
        fs.mv(tmp, path)
    except BaseException:
        with contextlib.suppress(Exception):
            fs.rm(tmp)
        raise


def write_bytes(uri: str, data: bytes, *, endpoint_url: str | None = None) -> None:
    """Write `data` to `uri` atomically."""
    try:
        with atomic_open(uri, endpoint_url=endpoint_url) as handle:
            handle.write(data)
    except StorageError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise StorageError(f"cannot write {uri}: {exc}") from exc


def write_text(uri: str, text: str, *, endpoint_url: str | None = None) -> None:
    write_bytes(uri, text.encode(), endpoint_url=endpoint_url)


def write_parquet(uri: str, table: Any, *, endpoint_url: str | None = None) -> None:
    """Write a pyarrow Table to `uri` as one Parquet file, atomically."""
    import pyarrow.parquet as pq

    with atomic_open(uri, endpoint_url=endpoint_url) as handle:
        pq.write_table(table, handle, compression="zstd")


def read_parquet(uri: str, *, endpoint_url: str | None = None,
                 columns: list[str] | None = None) -> Any:
    """A pyarrow Table from one Parquet file or every Parquet file under a prefix."""
    import pyarrow.parquet as pq

    fs, path = pyarrow_filesystem(uri, endpoint_url=endpoint_url)
    try:
        return pq.read_table(path, filesystem=fs, columns=columns)
    except FileNotFoundError as exc:
        raise StorageError(f"{uri} does not exist") from exc
    except Exception as exc:  # noqa: BLE001
        raise StorageError(f"cannot read Parquet at {uri}: {exc}") from exc


def publish_manifest(prefix: str, content: dict[str, Any], *,
                     endpoint_url: str | None = None) -> str:
    """Mark the outputs under `prefix` as complete. Write this last, after every output."""
    uri = join(prefix, MANIFEST)
    write_text(uri, json.dumps(content, indent=2, sort_keys=True, default=str),
               endpoint_url=endpoint_url)
    return uri


def read_manifest(prefix: str, *, endpoint_url: str | None = None) -> dict[str, Any] | None:
    """The manifest of a finished output prefix, or None when it never finished."""
    uri = join(prefix, MANIFEST)
    if not exists(uri, endpoint_url=endpoint_url):
        return None
    return json.loads(read_bytes(uri, endpoint_url=endpoint_url))
