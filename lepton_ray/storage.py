"""Object storage: the only module that knows about S3, endpoints and credentials.

A URI is a local path (``/data/x``, ``file:///data/x``, ``relative/x``) or ``s3://bucket/prefix``.
``resolve`` turns it into a pyarrow filesystem and a path on it; every other module reads and
writes through that pair, so Ray Data, Ray Train and Serve all see the same store.

S3-compatible endpoints (MinIO, moto, Ceph, R2) come from the ``endpoint_url`` argument, else
``LEPTON_S3_ENDPOINT``, else ``AWS_ENDPOINT_URL``; pyarrow ignores the latter on its own, so it is
passed as ``endpoint_override`` here.

Credentials are never given to the filesystem object: pyarrow's ``S3FileSystem`` pickles explicit
keys, and Ray pickles the filesystem into every Ray Data and Ray Train task. Built without them,
the AWS SDK's default chain (environment, ``~/.aws`` files, the instance's role) resolves them in
each process that uses the filesystem, so they never travel, and never appear in messages.

Names read from storage metadata (manifests, pointers) become paths only through
:meth:`Location.join`, which refuses any part that would leave the location; a delete never leaves
the location it is called on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import pyarrow.fs as pafs

from lepton_ray.errors import NotFoundError, StorageError

T = TypeVar("T")

DEFAULT_STORE_ENV = "LEPTON_STORE"
ENDPOINT_ENV = "LEPTON_S3_ENDPOINT"
_SECRET_ENVS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")
_READ_RETRIES = 3  # reads retried by Location.read_bytes, as the SDK's retry strategy below


def default_store() -> str:
    """The embedded default object store: ``$LEPTON_STORE`` or ``~/.lepton_ray/store``."""
    return os.environ.get(DEFAULT_STORE_ENV) or str(Path.home() / ".lepton_ray" / "store")


def endpoint_from_env(endpoint_url: str | None = None) -> str | None:
    """The S3 endpoint to use: the argument, else ``LEPTON_S3_ENDPOINT``, else ``AWS_ENDPOINT_URL``."""
    return (
        endpoint_url or os.environ.get(ENDPOINT_ENV) or os.environ.get("AWS_ENDPOINT_URL") or None
    )


@dataclass(frozen=True)
class Location:
    """A resolved URI: a pyarrow filesystem plus a path on it.

    ``uri`` is the canonical form users see (``s3://bucket/key`` or an absolute local path);
    ``endpoint_url`` is kept so that the location can be resolved again elsewhere (a Ray worker,
    a Serve replica) without carrying credentials around.
    """

    fs: pafs.FileSystem
    path: str
    uri: str
    endpoint_url: str | None = None

    @classmethod
    def from_filesystem(
        cls, fs: pafs.FileSystem, path: str, endpoint_url: str | None = None
    ) -> Location:
        """The location of ``path`` on ``fs``, e.g. a Ray Train checkpoint's
        ``(checkpoint.filesystem, checkpoint.path)``: ``s3://bucket/key`` on S3, the absolute path
        on a local disk. ``endpoint_url`` is the S3 endpoint ``fs`` talks to (kept so that the
        location can be resolved again elsewhere)."""
        if fs.type_name == "s3":
            key = path.strip("/")
            if not key:
                raise StorageError("empty S3 path (expected bucket/key)")
            return cls(fs, key, f"s3://{key}", endpoint_url)
        if fs.type_name == "local":
            local = posixpath.normpath(path)
            if not posixpath.isabs(local):
                raise StorageError(f"local path {path!r} is not absolute")
            return cls(fs, local, local, None)
        raise StorageError(
            f"unsupported filesystem '{fs.type_name}' for {path!r} (lepton_ray stores on local "
            "disks and S3)"
        )

    @property
    def is_s3(self) -> bool:
        """Whether this location is on S3 (decided by the filesystem, not by the text)."""
        return self.fs.type_name == "s3"

    @property
    def name(self) -> str:
        """The last part of the path (a checkpoint's folder name, a file's name)."""
        return posixpath.basename(self.path.rstrip("/"))

    @property
    def parent(self) -> Location:
        """The folder this location is in."""
        path, uri = (
            posixpath.dirname(self.path.rstrip("/")),
            posixpath.dirname(self.uri.rstrip("/")),
        )
        if not path or path == self.path or (self.is_s3 and "/" not in self.path):
            raise StorageError(f"{self.uri} has no parent folder")
        return Location(self.fs, path, uri, self.endpoint_url)

    def join(self, *parts: str) -> Location:
        """The location of a child path; ``parts`` may hold ``/``-separated segments.

        Refuses (one-line :class:`StorageError`) any part that is empty, absolute, or holds
        ``.``, ``..``, a backslash or a NUL: names read from manifests and pointers reach the
        filesystem only through here, so nothing can point outside this location.
        """
        segments: list[str] = []
        for part in parts:
            if not isinstance(part, str):
                raise StorageError(f"path part {part!r} under {self.uri} is not a string")
            if part.startswith("/"):
                raise StorageError(f"refusing absolute path {part!r} under {self.uri}")
            for seg in part.split("/"):
                if seg in ("", ".", "..") or "\\" in seg or "\x00" in seg:
                    raise StorageError(
                        f"refusing path {part!r} under {self.uri}: it must be plain names "
                        "separated by '/' (no empty, '.' or '..' parts, no backslashes)"
                    )
                segments.append(seg)
        if not segments:
            raise StorageError(f"no path to join under {self.uri}")
        sub = "/".join(segments)
        return Location(
            self.fs,
            posixpath.join(self.path, sub),
            self.uri.rstrip("/") + "/" + sub,
            self.endpoint_url,
        )

    # --- reads -----------------------------------------------------------------------------
    def exists(self) -> bool:
        info = _call(lambda: self.fs.get_file_info(self.path), self)
        return info.type != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        info = _call(lambda: self.fs.get_file_info(self.path), self)
        return info.type == pafs.FileType.Directory

    def read_bytes(self) -> bytes:
        def read() -> bytes:
            with self.fs.open_input_stream(self.path) as f:
                return f.read()

        return self._read(read)

    def read_json(self) -> Any:
        return json.loads(self.read_bytes())

    def read_range(self, offset: int, size: int) -> bytes:
        """``size`` bytes from ``offset`` (an S3 ranged GET): a sharded checkpoint's rows."""
        return self.read_file(lambda f: f.read_at(size, offset))

    def read_file(self, reader: Callable[[Any], T]) -> T:
        """``reader``'s result on this object opened for random access: only the bytes it reads
        travel (ranged GETs on S3), e.g. a Parquet file's footer and the column chunks asked
        for. Errors are explained as :meth:`read_bytes` explains them."""

        def read() -> T:
            with self.fs.open_input_file(self.path) as f:
                return reader(f)

        return self._read(read)

    def _read(self, read: Callable[[], T]) -> T:
        """``read`` with its errors explained, retried on S3 (:func:`_retried`)."""
        return _call(_retried(read) if self.is_s3 else read, self)

    def listdir(self) -> list[str]:
        """Names (not paths) directly below this location; empty when it does not exist."""
        sel = pafs.FileSelector(self.path, allow_not_found=True, recursive=False)
        infos = _call(lambda: self.fs.get_file_info(sel), self)
        return sorted(posixpath.basename(i.path.rstrip("/")) for i in infos)

    # --- writes ----------------------------------------------------------------------------
    def write_bytes(self, data: bytes) -> None:
        """Write an object so that readers see either the old or the new content.

        On S3 a single PUT is atomic. On a local disk the bytes go to a temporary sibling that is
        fsynced, renamed over the target, and the folder fsynced after: once this returns, the
        object survives a crash, so a manifest written after it never publishes a missing file.
        """
        if self.is_s3:

            def put() -> None:
                with self.fs.open_output_stream(self.path) as f:
                    f.write(data)

            _call(put, self)
        elif self.fs.type_name == "local":
            _call(lambda: _write_local_durably(self.path, data), self)
        else:
            raise StorageError(f"cannot write to filesystem '{self.fs.type_name}' at {self.uri}")

    def write_json(self, obj: Any) -> None:
        self.write_bytes(json.dumps(obj, indent=2, sort_keys=True).encode())

    def upload_file(self, local_path: str | os.PathLike) -> str:
        """Copy a local file here (atomically, as ``write_bytes``); returns its sha256."""
        data = Path(local_path).read_bytes()
        self.write_bytes(data)
        return hashlib.sha256(data).hexdigest()

    def delete(self) -> None:
        """Delete this object or directory tree; a missing one is fine.

        Only what is at or below this location goes: a symbolic link is removed, never followed,
        and the root of a disk or a whole bucket is refused.
        """
        if (self.is_s3 and "/" not in self.path.strip("/")) or posixpath.dirname(
            self.path
        ) == self.path:
            raise StorageError(f"refusing to delete {self.uri}: it is a bucket or disk root")

        def rm() -> None:
            if self.fs.type_name == "local" and os.path.islink(self.path):
                os.unlink(self.path)
                return
            info = self.fs.get_file_info(self.path)
            if info.type == pafs.FileType.Directory:
                self.fs.delete_dir(self.path)
            elif info.type == pafs.FileType.File:
                self.fs.delete_file(self.path)

        _call(rm, self)

    def ensure_writable(self) -> None:
        """Fail early, with a clear message, when the bucket is missing or not writable."""
        if self.is_s3:
            bucket = self.path.split("/", 1)[0]
            info = _call(lambda: self.fs.get_file_info(bucket), self)
            if info.type == pafs.FileType.NotFound:
                raise StorageError(f"bucket '{bucket}' does not exist ({_where(self)})")
        else:
            _call(lambda: self.fs.create_dir(self.path, recursive=True), self)

    def __str__(self) -> str:
        return self.uri


def resolve(uri: str | os.PathLike | Location, endpoint_url: str | None = None) -> Location:
    """Turn a URI into a :class:`Location` (filesystem + path)."""
    if isinstance(uri, Location):
        return uri
    uri = os.fspath(uri)
    if not uri:
        raise StorageError("empty storage URI")
    parsed = urlparse(uri)
    if parsed.scheme in ("s3", "s3a"):
        if not parsed.netloc:
            raise StorageError(f"S3 URI has no bucket: {uri!r} (expected s3://bucket/prefix)")
        endpoint = endpoint_from_env(endpoint_url)
        path = (parsed.netloc + "/" + parsed.path.lstrip("/")).rstrip("/")
        if any(seg in (".", "..") for seg in path.split("/")):
            raise StorageError(f"S3 URI {uri!r} has '.' or '..' parts (S3 keys are not paths)")
        return Location(_s3_filesystem(endpoint), path, f"s3://{path}", endpoint)
    if parsed.scheme in ("", "file"):
        local = parsed.path if parsed.scheme == "file" else uri
        path = str(Path(local).expanduser().resolve())
        return Location(pafs.LocalFileSystem(), path, path, None)
    raise StorageError(
        f"unsupported storage URI scheme '{parsed.scheme}://' in {uri!r} (use a path or s3://)"
    )


class _S3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3 filesystem, rebuilt by :func:`_s3_filesystem` where it is unpickled.

    pyarrow pickles an ``S3FileSystem`` without its retry strategy, so the copy Ray ships to a
    Ray Data task, the Train controller or a worker would retry with pyarrow's default (the
    draining standard strategy, 3 attempts); rebuilt from the endpoint alone, every copy gets
    the options below and resolves credentials where it runs.
    """

    def __init__(self, endpoint: str | None, **kwargs: Any):
        super().__init__(**kwargs)
        self._endpoint = endpoint

    def __reduce__(self) -> tuple[Any, tuple[str | None]]:
        return _s3_filesystem, (self._endpoint,)


def _s3_filesystem(endpoint: str | None) -> pafs.S3FileSystem:
    kwargs: dict[str, Any] = {
        "region": os.environ.get("AWS_REGION")
        or os.environ.get("AWS_DEFAULT_REGION")
        or "us-east-1",
        "connect_timeout": float(os.environ.get("LEPTON_S3_CONNECT_TIMEOUT", "5")),
        "request_timeout": float(os.environ.get("LEPTON_S3_REQUEST_TIMEOUT", "60")),
        # 3 retries (4 attempts, 25/50/100 ms apart) for real networks; an unreachable endpoint
        # still fails within seconds. Not AwsStandardS3RetryStrategy: its retry quota is spent by
        # every retry and, through pyarrow, never refilled, so a filesystem stops retrying for
        # good after ~100 transient errors (tests/test_chaos.py). The default strategy has none.
        "retry_strategy": pafs.AwsDefaultS3RetryStrategy(max_attempts=3),
        # An object smaller than a part goes up as one PUT (else: create, part, complete). One
        # request to retry, not three, and no CompleteMultipartUpload, whose pyarrow fix-up resends
        # a completion the SDK had already retried and fails the write (tests/test_chaos.py).
        "allow_delayed_open": True,
    }
    if endpoint:
        ep = urlparse(endpoint if "://" in endpoint else f"http://{endpoint}")
        if not ep.netloc:
            raise StorageError(f"invalid S3 endpoint URL {endpoint!r}")
        kwargs["endpoint_override"] = ep.netloc
        kwargs["scheme"] = ep.scheme or "http"
        kwargs["allow_bucket_creation"] = True
        kwargs["allow_bucket_deletion"] = True
    # No access_key/secret_key here: explicit keys would be pickled with the filesystem into
    # every Ray task. The SDK's default chain reads AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /
    # AWS_SESSION_TOKEN, ~/.aws and the instance role in whichever process uses it.
    return _S3FileSystem(endpoint, **kwargs)


def _write_local_durably(path: str, data: bytes) -> None:
    """Temporary sibling, fsync, rename over ``path``, fsync the folder (POSIX durability)."""
    parent = os.path.dirname(path) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fd = os.open(parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def redact(text: str) -> str:
    """Remove credential values that may have leaked into a message."""
    for name in _SECRET_ENVS:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


def _where(loc: Location) -> str:
    return f"{loc.uri} via {loc.endpoint_url}" if loc.endpoint_url else loc.uri


def explain(exc: BaseException, loc: Location) -> StorageError:
    """Translate a pyarrow/S3 error into a one-line :class:`StorageError`."""
    if isinstance(exc, StorageError):
        return exc
    msg = redact(str(exc))
    low = msg.lower()
    bucket = loc.path.split("/", 1)[0] if loc.is_s3 else ""
    if "no_such_bucket" in low or "nosuchbucket" in low or "bucket does not exist" in low:
        return StorageError(f"bucket '{bucket}' does not exist ({_where(loc)})")
    if any(
        s in low
        for s in (
            "invalid_access_key",
            "invalidaccesskeyid",
            "signature_does_not_match",
            "signaturedoesnotmatch",
            "access_denied",
            "accessdenied",
            "forbidden",
            "http response code: 403",
        )
    ):
        return StorageError(
            f"access denied to {loc.uri}: the S3 credentials were rejected "
            "(check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
        )
    if any(
        s in low
        for s in (
            "network_connection",
            "couldn't connect",
            "could not connect",
            "connection refused",
            "curl error",
            "timeout",
            "timed out",
            "unable to connect",
            "failed to connect",
            "resolve host",
        )
    ):
        return StorageError(
            f"cannot reach the S3 endpoint {loc.endpoint_url or 'of AWS'} for {loc.uri}"
        )
    if (
        isinstance(exc, FileNotFoundError)
        or "not found" in low
        or "no such file" in low
        or "path does not exist" in low
    ):
        if loc.is_s3 and not _bucket_exists(loc):
            return StorageError(f"bucket '{bucket}' does not exist ({_where(loc)})")
        return NotFoundError(f"not found: {loc.uri}")
    if isinstance(exc, PermissionError):
        return StorageError(f"permission denied: {loc.uri}")
    first = msg.strip().splitlines()[0] if msg.strip() else type(exc).__name__
    return StorageError(f"storage error at {loc.uri}: {first}")


def _retried(read: Callable[[], T]) -> Callable[[], T]:
    """``read`` retried on S3's transient errors.

    pyarrow reads into a buffer of the size asked for (an object's, or a range's): an error
    answer larger than that (S3's are ~250 bytes; pointers, manifests and a small shard's column
    chunks are smaller) does not fit, and the SDK reports it as a failure it does not retry. So
    retry here, as the SDK would have (tests/test_chaos.py); a missing object or a refusal fails
    at once."""

    def retried() -> T:
        for attempt in range(_READ_RETRIES):
            try:
                return read()
            except (FileNotFoundError, PermissionError):
                raise
            except OSError:
                time.sleep(0.025 * 2**attempt)
        return read()

    return retried


def _bucket_exists(loc: Location) -> bool:
    try:
        bucket = loc.path.split("/", 1)[0]
        return loc.fs.get_file_info(bucket).type != pafs.FileType.NotFound
    except OSError:
        return True  # cannot tell; keep the plain "not found"


def _call(fn, loc: Location):
    try:
        return fn()
    except StorageError:
        raise
    except (OSError, ValueError) as exc:
        raise explain(exc, loc) from None


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
