"""Where finished outputs (MP4s, chunk previews) live: a folder, possibly on a shared filesystem, or an
S3-compatible object store that API replicas and GPU workers on different machines all reach.

Owns:

* :class:`OutputStore`: the interface both kinds share. ``publish`` turns a finished local file into the output
  ``name`` atomically (a reader sees the old object or the whole new one, never half of one); ``exists``,
  ``delete``, ``names``, ``read``, ``open`` (a reader for the API to stream an object, byte ranges included),
  ``presigned_url`` and ``location`` (printable, never a secret).
* :class:`LocalOutputStore`: a folder, as the server has always used (``serving/files.py`` serves it through the
  API's own signed ``/files`` URLs, so it hands out no presigned URLs).
* :class:`S3OutputStore`: a bucket and key prefix on AWS S3 or any S3-compatible server (MinIO, Ceph, R2, ...)
  through boto3, which is imported only when an ``s3://`` location is opened: folder users need neither boto3
  nor its configuration. Credentials and the region come from boto3's own chain (``AWS_ACCESS_KEY_ID``,
  ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, profiles, instance roles) unless given explicitly.
* :func:`open_output_store`: which of the two a location names; opening checks that the place is reachable, so a
  misconfigured endpoint or bucket fails at start with one line instead of at the first finished job.

Every failure surfaces as :class:`OutputStoreError`, one line that names the location.

Names are relative keys of one or two components (``<job>.mp4``, ``uploads/<token>.png``) of letters, digits,
``.``, ``_`` and ``-``, never starting with a dot: so no name can climb out of the folder or prefix, and the
folder's own dot files (the URL-signing secret, ``.part`` files being written) are neither served nor listed.
"""
from __future__ import annotations

import abc
import errno
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from magi_server.serving.files import SNIFF_BYTES, open_stored, sniff_media

S3_SCHEME = "s3://"
READ_CHUNK = 256 * 1024
# SigV4 presigned URLs live at most a week; S3 refuses to sign longer
MAX_PRESIGNED_S = 7 * 24 * 3600
_COMPONENT = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}$")
MAX_COMPONENTS = 2


class OutputStoreError(Exception):
    """An output store could not do what was asked; the message is one line naming the store's location."""


def validate_name(name: str) -> str:
    """``name`` if it is a safe output name (see the module docstring), else OutputStoreError. Absolute paths,
    ``..``, empty components, backslashes and dot files are all refused before any path or key is built."""
    parts = name.split("/") if isinstance(name, str) else []
    if not parts or len(parts) > MAX_COMPONENTS or not all(_COMPONENT.fullmatch(p) for p in parts):
        raise OutputStoreError(f"not a valid output name: {name!r}")
    return name


def is_s3_url(location: str | os.PathLike) -> bool:
    return isinstance(location, str) and location.strip().lower().startswith(S3_SCHEME)


class OutputReader(abc.ABC):
    """One stored object opened for reading: ``size`` is fixed at open, and every range read comes from that same
    version (a publish over the name meanwhile makes a read fail rather than mix two versions). Close it, or use
    it as a context manager."""

    size: int

    @abc.abstractmethod
    def iter_bytes(self, start: int = 0, end: int | None = None, chunk_size: int = READ_CHUNK) -> Iterator[bytes]:
        """The bytes ``[start, end)`` (``end`` None: to the end), in pieces of at most ``chunk_size``."""

    def read(self, start: int = 0, end: int | None = None) -> bytes:
        return b"".join(self.iter_bytes(start, end))

    def head(self) -> bytes:
        """The first bytes, enough for :func:`serving.files.sniff_media` to tell the content type."""
        return self.read(0, min(SNIFF_BYTES, self.size))

    def close(self) -> None:
        pass

    def __enter__(self) -> "OutputReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _bounds(self, start: int, end: int | None) -> tuple[int, int]:
        end = self.size if end is None else min(end, self.size)
        if start < 0 or start > end:
            raise ValueError(f"bad byte range {start}-{end} of {self.size}")
        return start, end


class OutputStore(abc.ABC):
    """Finished outputs by name; see the module docstring. Methods block (call them from a thread in async code)."""

    #: printable description (a folder, or ``s3://bucket/prefix at <endpoint>``), never holding a secret
    location: str

    @abc.abstractmethod
    def publish(self, local_path: str | os.PathLike, name: str) -> None:
        """Make the finished file ``local_path`` the output ``name``, replacing any object of that name atomically.
        The local file is consumed: moved into place, or removed once uploaded."""

    @abc.abstractmethod
    def exists(self, name: str) -> bool: ...

    @abc.abstractmethod
    def delete(self, name: str) -> None:
        """Remove ``name``; a missing one is fine."""

    @abc.abstractmethod
    def names(self, prefix: str = "") -> list[str]:
        """The stored names starting with ``prefix``, sorted."""

    @abc.abstractmethod
    def open(self, name: str) -> OutputReader | None:
        """A reader of ``name``, or None when there is none."""

    def read(self, name: str) -> bytes | None:
        """The whole of ``name``, or None when there is none."""
        reader = self.open(name)
        if reader is None:
            return None
        with reader:
            return reader.read()

    def presigned_url(self, name: str, expires_in_s: float) -> str | None:
        """A URL that anyone holding it may GET ``name`` with for ``expires_in_s`` seconds, signed by the store
        itself; None where the store has no such URLs (then the API's own signed URLs serve the object)."""
        validate_name(name)
        return None

    def close(self) -> None:
        pass

    def _error(self, what: str) -> OutputStoreError:
        return OutputStoreError(f"output store {self.location}: {what}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.location!r})"


# ------------------------------------------------------------------------------------------------ the folder


class _LocalReader(OutputReader):
    def __init__(self, fd: int, size: int) -> None:
        self._fd, self.size = fd, size

    def iter_bytes(self, start: int = 0, end: int | None = None, chunk_size: int = READ_CHUNK) -> Iterator[bytes]:
        position, end = self._bounds(start, end)
        while position < end:
            piece = os.pread(self._fd, min(chunk_size, end - position), position)
            if not piece:  # truncated under us (never by publish, which replaces the name, not the file)
                raise OSError(f"stored file ended at {position} of {end} bytes")
            position += len(piece)
            yield piece

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class LocalOutputStore(OutputStore):
    """Outputs as files in ``folder`` (created when absent). Publishing renames within the folder's filesystem (or
    copies to a hidden temporary file beside the target, then renames), so readers, on this machine or over a
    shared filesystem, see whole files only. Reads follow no symbolic link below the folder
    (:func:`serving.files.open_stored`), and an empty file reads as absent there, as the file routes treat it (an
    upload ticket not yet written)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.location = str(self.folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise self._error(f"cannot create the folder ({exc.strerror or exc})") from None
        if not self.folder.is_dir():
            raise self._error("not a folder")

    def _split(self, name: str) -> tuple[str | None, str]:
        parts = validate_name(name).split("/")
        return (parts[0], parts[1]) if len(parts) == 2 else (None, parts[0])

    def publish(self, local_path: str | os.PathLike, name: str) -> None:
        subfolder, leaf = self._split(name)
        source = Path(local_path)
        parent = self.folder if subfolder is None else self.folder / subfolder
        target = parent / leaf
        try:
            if not source.is_file():
                raise self._error(f"cannot publish {name}: {source} is not a file")
            parent.mkdir(exist_ok=True)
            if parent.is_symlink():  # a link planted as the subfolder: never write through it
                raise self._error(f"cannot publish {name}: {subfolder} is a link")
            try:
                os.replace(source, target)  # atomic within one filesystem: the usual case
                return
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
            # another filesystem: copy beside the target under a hidden name, flush, then the atomic rename
            temporary = parent / f".{leaf}.{secrets.token_hex(8)}.part"
            try:
                with open(source, "rb") as reading, open(temporary, "xb") as writing:
                    shutil.copyfileobj(reading, writing, READ_CHUNK)
                    writing.flush()
                    os.fsync(writing.fileno())
                os.replace(temporary, target)
            finally:
                temporary.unlink(missing_ok=True)
            source.unlink(missing_ok=True)
        except OutputStoreError:
            raise
        except OSError as exc:
            raise self._error(f"cannot publish {name} ({exc.strerror or exc})") from None

    def open(self, name: str) -> OutputReader | None:
        subfolder, leaf = self._split(name)
        found = open_stored(self.folder, leaf, subfolder)
        if found is None:
            return None
        fd, info = found
        return _LocalReader(fd, info.st_size)

    def exists(self, name: str) -> bool:
        reader = self.open(name)
        if reader is None:
            return False
        reader.close()
        return True

    def delete(self, name: str) -> None:
        subfolder, leaf = self._split(name)
        target = (self.folder if subfolder is None else self.folder / subfolder) / leaf
        try:
            target.unlink(missing_ok=True)  # unlinks a planted link itself, never what it points at
        except OSError as exc:
            raise self._error(f"cannot delete {name} ({exc.strerror or exc})") from None

    def names(self, prefix: str = "") -> list[str]:
        found: list[str] = []
        try:
            with os.scandir(self.folder) as top:
                for entry in top:
                    if not _COMPONENT.fullmatch(entry.name):
                        continue  # dot files: the signing secret, .part files being written
                    if entry.is_file(follow_symlinks=False):
                        found.append(entry.name)
                    elif entry.is_dir(follow_symlinks=False):
                        with os.scandir(entry.path) as inner:
                            found.extend(f"{entry.name}/{e.name}" for e in inner
                                         if _COMPONENT.fullmatch(e.name) and e.is_file(follow_symlinks=False))
        except OSError as exc:
            raise self._error(f"cannot list ({exc.strerror or exc})") from None
        return sorted(n for n in found if n.startswith(prefix))


# -------------------------------------------------------------------------------------------- S3-compatible


class _S3Reader(OutputReader):
    def __init__(self, store: "S3OutputStore", key: str, size: int, etag: str) -> None:
        self._store, self._key, self.size, self._etag = store, key, size, etag

    def iter_bytes(self, start: int = 0, end: int | None = None, chunk_size: int = READ_CHUNK) -> Iterator[bytes]:
        start, end = self._bounds(start, end)
        if start == end:
            return
        # If-Match pins the version opened: a publish over the name meanwhile is a 412, never a mix of two files
        response = self._store._call("read", self._key, "get_object", Bucket=self._store.bucket, Key=self._key,
                                     Range=f"bytes={start}-{end - 1}", IfMatch=self._etag)
        body = response["Body"]
        try:
            for piece in body.iter_chunks(chunk_size):
                yield piece
        except Exception as exc:  # a dropped connection mid-body
            raise self._store._error(f"reading {self._key} failed ({type(exc).__name__}: {exc})") from None
        finally:
            body.close()


class S3OutputStore(OutputStore):
    """Outputs as objects ``<prefix>/<name>`` in ``bucket``. An object appears whole when its PUT (or, for large
    files, boto3's multipart upload) completes, which is S3's own atomicity; presigned GET URLs let clients
    download straight from the store.

    ``endpoint_url`` names an S3-compatible server (None: AWS, or boto3's own ``AWS_ENDPOINT_URL``); such servers
    are addressed path-style (``http://host/bucket/key``), which needs no wildcard DNS (botocore does the same for
    an endpoint it read from the environment). The bucket must exist: it is checked with one HEAD at construction,
    so a wrong endpoint, bucket or credentials fail here, in one line."""

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None,
                 region_name: str | None = None, access_key_id: str | None = None,
                 secret_access_key: str | None = None, session_token: str | None = None,
                 connect_timeout_s: float = 5.0, read_timeout_s: float = 60.0, max_attempts: int = 3) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        shown = f"{S3_SCHEME}{bucket}/{self.prefix}" if self.prefix else f"{S3_SCHEME}{bucket}"
        self.location = f"{shown} at {_without_userinfo(endpoint_url)}" if endpoint_url else shown
        client = self._make_client(region_name, access_key_id, secret_access_key, session_token,
                                   connect_timeout_s, read_timeout_s, max_attempts)
        self._client = client
        # where boto3 actually points (its own AWS_ENDPOINT_URL, or AWS's regional endpoint) goes into messages too
        actual = getattr(getattr(client, "meta", None), "endpoint_url", None)
        if not endpoint_url and isinstance(actual, str):
            self.location = f"{shown} at {_without_userinfo(actual)}"
        try:
            self._check_bucket()
        except OutputStoreError:
            self.close()
            raise

    def _make_client(self, region_name, access_key_id, secret_access_key, session_token,
                     connect_timeout_s, read_timeout_s, max_attempts):
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise self._error("boto3 is not installed (pip install 'magi-server[s3]')") from None
        config = Config(
            signature_version="s3v4",
            connect_timeout=connect_timeout_s,
            read_timeout=read_timeout_s,
            retries={"max_attempts": max_attempts, "mode": "standard"},
            s3={"addressing_style": "path"} if self.endpoint_url else {},
        )
        try:
            # a session of its own: boto3's default session is shared module state, not safe across threads
            session = boto3.session.Session(aws_access_key_id=access_key_id, aws_secret_access_key=secret_access_key,
                                            aws_session_token=session_token, region_name=region_name)
            return session.client("s3", endpoint_url=self.endpoint_url, config=config)
        except Exception as exc:  # a malformed endpoint URL, an unknown profile
            raise self._error(f"cannot make an S3 client ({_one_line(exc)})") from None

    def _key(self, name: str) -> str:
        validate_name(name)
        return f"{self.prefix}/{name}" if self.prefix else name

    def _call(self, doing: str, key: str | None, operation: str, **kw):
        """One client call, with every botocore failure turned into one OutputStoreError line."""
        try:
            return getattr(self._client, operation)(**kw)
        except Exception as exc:
            raise self._error(f"{doing}{' ' + key if key else ''} failed ({_describe(exc)})") from None

    def _check_bucket(self) -> None:
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except Exception as exc:
            status = _status(exc)
            if status == 404:
                raise self._error(f"bucket {self.bucket!r} does not exist") from None
            if status == 403:
                raise self._error(f"access to bucket {self.bucket!r} denied (check the credentials)") from None
            raise self._error(f"cannot reach the store ({_describe(exc)})") from None

    def publish(self, local_path: str | os.PathLike, name: str) -> None:
        key = self._key(name)
        source = Path(local_path)
        try:
            with open(source, "rb") as file:
                kind = sniff_media(file.read(SNIFF_BYTES))
        except OSError as exc:
            raise self._error(f"cannot publish {name}: {source} ({exc.strerror or exc})") from None
        # the stored content type is what a presigned download is served as (browsers play video/mp4 inline)
        extra = {"ContentType": kind.content_type if kind is not None else "application/octet-stream"}
        self._call("upload of", key, "upload_file", Filename=str(source), Bucket=self.bucket, Key=key,
                   ExtraArgs=extra)
        source.unlink(missing_ok=True)

    def _head(self, key: str) -> dict | None:
        try:
            return self._client.head_object(Bucket=self.bucket, Key=key)
        except Exception as exc:
            if _status(exc) == 404:
                return None
            raise self._error(f"looking up {key} failed ({_describe(exc)})") from None

    def exists(self, name: str) -> bool:
        return self._head(self._key(name)) is not None

    def open(self, name: str) -> OutputReader | None:
        key = self._key(name)
        head = self._head(key)
        if head is None:
            return None
        return _S3Reader(self, key, int(head["ContentLength"]), head["ETag"])

    def read(self, name: str) -> bytes | None:
        key = self._key(name)
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=key)
            with response["Body"] as body:
                return body.read()
        except Exception as exc:
            if _status(exc) == 404:
                return None
            raise self._error(f"reading {key} failed ({_describe(exc)})") from None

    def delete(self, name: str) -> None:
        key = self._key(name)
        self._call("delete of", key, "delete_object", Bucket=self.bucket, Key=key)  # S3 answers 204 when missing

    def names(self, prefix: str = "") -> list[str]:
        base = f"{self.prefix}/" if self.prefix else ""
        found: list[str] = []
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                           Prefix=base + prefix)
            for page in pages:
                found.extend(item["Key"][len(base):] for item in page.get("Contents", ()))
        except Exception as exc:
            raise self._error(f"listing failed ({_describe(exc)})") from None
        return sorted(found)

    def presigned_url(self, name: str, expires_in_s: float) -> str | None:
        key = self._key(name)
        seconds = int(expires_in_s)
        if not 1 <= seconds <= MAX_PRESIGNED_S:
            raise self._error(f"a presigned URL lives 1 s to 7 days, not {expires_in_s} s")
        # signing is local (no request); it fails only without credentials
        return self._call("signing", key, "generate_presigned_url", ClientMethod="get_object",
                          Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=seconds)

    def close(self) -> None:
        close = getattr(self._client, "close", None)
        if close is not None:
            close()


def _status(exc: BaseException) -> int | None:
    """The HTTP status of a botocore ClientError, else None (connection failures and the like)."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status is not None:
            return int(status)
        code = str(response.get("Error", {}).get("Code", ""))
        if code.isdigit():
            return int(code)
    return None


def _describe(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict) and response.get("Error"):
        error = response["Error"]
        status = _status(exc)
        return _one_line(f"{error.get('Code', '?')}{f' (HTTP {status})' if status else ''}: "
                         f"{error.get('Message') or ''}".rstrip(": "))
    return _one_line(f"{type(exc).__name__}: {exc}")


def _one_line(text: object) -> str:
    return " ".join(str(text).split())[:300]


def _without_userinfo(url: str) -> str:
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def _printable_s3(location: str) -> str:
    """A malformed ``s3://`` location as it may be printed: whatever stood before an ``@`` (a secret) is left out."""
    parts = urlsplit(location.strip())
    return _one_line(f"{S3_SCHEME}{parts.netloc.rsplit('@', 1)[-1]}{parts.path}")


def parse_s3_url(location: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` as (bucket, prefix); ValueError (without echoing the URL, which could carry a
    secret) for anything else."""
    parts = urlsplit(location.strip())
    if parts.scheme.lower() != "s3" or not parts.netloc:
        raise ValueError("an S3 location is s3://bucket[/prefix]")
    if "@" in parts.netloc or ":" in parts.netloc or parts.query or parts.fragment:
        raise ValueError("an S3 location is s3://bucket[/prefix], with no credentials, port or query: "
                         "credentials come from the AWS environment variables, the server from the endpoint URL")
    prefix = parts.path.strip("/")
    if prefix and not all(_COMPONENT.fullmatch(p) for p in prefix.split("/")):
        raise ValueError("an S3 prefix is made of letters, digits, '.', '_' and '-' between slashes")
    return parts.netloc, prefix


def open_output_store(location: str | os.PathLike, *, endpoint_url: str | None = None,
                      region_name: str | None = None, access_key_id: str | None = None,
                      secret_access_key: str | None = None, session_token: str | None = None) -> OutputStore:
    """The store ``location`` names: ``s3://bucket[/prefix]`` an :class:`S3OutputStore` (``endpoint_url`` for an
    S3-compatible server; credentials from boto3's chain unless given), any other string or path a
    :class:`LocalOutputStore` folder. Raises OutputStoreError (one line naming the location) when the store
    cannot be reached or used."""
    if is_s3_url(location):
        try:
            bucket, prefix = parse_s3_url(location)
        except ValueError as exc:
            raise OutputStoreError(f"output store {_printable_s3(location)}: {exc}") from None
        return S3OutputStore(bucket, prefix, endpoint_url=endpoint_url or None, region_name=region_name,
                             access_key_id=access_key_id, secret_access_key=secret_access_key,
                             session_token=session_token)
    return LocalOutputStore(location)
