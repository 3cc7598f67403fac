"""Stored files over HTTP: who may read them, what they are served as, and how they are opened.

Owns:

* :class:`FileSigner`: signed URLs (HMAC-SHA256 over the path and an expiry, ``?exp=<unix s>&sig=<hex>``) and the
  owner tag inside upload tokens. The WaveSpeed, fal and Magic Hour SDKs download the output URLs we hand out with
  a bare HTTP client, so those URLs carry a signature instead of needing the API key. The secret is the
  configured one, else a random one kept in ``<outputs>/.url-signing-key`` (mode 0600), so URLs survive restarts.
* :func:`sniff_media`: what bytes are, from their magic numbers (never from a name or a client's content type).
  Uploads are accepted only as the image and video kinds it knows, and every served file's content type is the
  sniffed one, so nothing we serve is ever ``text/html`` or ``image/svg+xml``.
* :func:`open_stored`: opening a stored file without following a symbolic link anywhere below the outputs folder.
* :func:`add_file_routes`: ``GET /files/{name}`` (outputs and chunk previews) and ``GET /files/uploads/{name}``
  (uploads and stored input images). A file answers to a valid signed URL, or to its owner's API key
  (``Authorization: Bearer <key>`` or ``Key <key>``, whichever the listener's API uses); anyone else gets a 404
  (no existence oracle), and a bad or expired signature a 403. With no API keys configured (loopback dev mode)
  there are no tenants, so unsigned requests are served as before; URLs are signed either way, and a signature
  that is present is checked.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import re
import secrets
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

if TYPE_CHECKING:  # common imports this module: the context is only a type here
    from magi_server.serving.common import ServerContext

log = logging.getLogger("magi_server.serving.files")

OUTPUT_NAME = re.compile(r"^[0-9a-f]{32}(\.chunk\d{1,5})?\.mp4$")  # <job id>.mp4 and its chunk previews
UPLOAD_NAME = re.compile(r"^[A-Za-z0-9_-]{1,80}\.[a-z0-9]{1,8}$")  # <token>.<ext>, input-<hex>.png
SECRET_FILE = ".url-signing-key"
SNIFF_BYTES = 32  # enough for every signature sniff_media knows
READ_CHUNK = 256 * 1024


# ------------------------------------------------------------------------------------------------- sniffing


@dataclass(frozen=True)
class MediaKind:
    content_type: str
    extension: str

    @property
    def family(self) -> str:
        """``image`` or ``video``: what WaveSpeed's upload answer calls the file's ``type``."""
        return self.content_type.split("/", 1)[0]


# ISO base media brands (bytes 8-12 after "ftyp") that are stills, and QuickTime's; every other brand is MP4 video
_FTYP_IMAGES = {b"avif": MediaKind("image/avif", "avif"), b"avis": MediaKind("image/avif", "avif"),
                b"heic": MediaKind("image/heic", "heic"), b"heix": MediaKind("image/heic", "heic"),
                b"mif1": MediaKind("image/heif", "heif"), b"msf1": MediaKind("image/heif", "heif")}
_QUICKTIME = MediaKind("video/quicktime", "mov")
_MP4 = MediaKind("video/mp4", "mp4")


def sniff_media(head: bytes) -> MediaKind | None:
    """The image or video kind ``head`` (a file's first bytes) starts like; None for anything else (HTML, SVG, text,
    scripts, archives, ...). Browsers are told this type with ``nosniff``, so they never guess one of their own."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return MediaKind("image/png", "png")
    if head.startswith(b"\xff\xd8\xff"):
        return MediaKind("image/jpeg", "jpg")
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return MediaKind("image/webp", "webp")
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return MediaKind("image/gif", "gif")
    if head[4:8] == b"ftyp" and len(head) >= 12:
        brand = head[8:12]
        return _FTYP_IMAGES.get(brand) or (_QUICKTIME if brand == b"qt  " else _MP4)
    if head.startswith(b"\x1a\x45\xdf\xa3"):  # EBML: WebM and Matroska
        return MediaKind("video/webm", "webm")
    return None


ACCEPTED_KINDS = "a PNG, JPEG, WebP or GIF image, or an MP4, MOV or WebM video"


# -------------------------------------------------------------------------------------------------- signing


def _load_or_create_secret(folder: Path) -> bytes:
    """The signing secret kept in ``folder``: read it, or create it (mode 0600) when absent. Creation is atomic
    (link of a complete temporary file), so two processes starting at once end up with the same secret."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / SECRET_FILE
    for _ in range(2):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            tmp = folder / f".{SECRET_FILE}.{secrets.token_hex(8)}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                os.write(fd, secrets.token_hex(32).encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(tmp, path)  # fails when another process created it first: then its secret is read
            except FileExistsError:
                pass
            finally:
                tmp.unlink(missing_ok=True)
            continue
        try:
            secret = os.read(fd, 4096).strip()
        finally:
            os.close(fd)
        if len(secret) >= 32:
            return secret
        raise ValueError(f"{path} holds no usable secret (delete it to make a new one)")
    raise OSError(f"could not create {path}")


class FileSigner:
    """Signs and checks file URLs, and tags upload tokens with their owner. ``clock`` is wall time (tests fake it).

    A signature covers the path (``/files/<name>``), not the host: fal hands its outputs out on the listener the
    client used, and every listener serves the same files."""

    def __init__(self, secret: bytes, ttl_s: float, clock: Callable[[], float] = time.time) -> None:
        self._secret = secret
        self.ttl_s = ttl_s
        self.clock = clock

    @classmethod
    def for_settings(cls, settings) -> "FileSigner":
        if settings.file_url_secret:
            secret = settings.file_url_secret.encode()
        else:
            try:
                secret = _load_or_create_secret(Path(settings.outputs_dir))
            except OSError as exc:  # a read-only outputs folder: URLs then last until a restart
                log.warning("cannot keep the URL signing secret in %s (%s); signed URLs end with this process",
                            settings.outputs_dir, exc)
                secret = secrets.token_hex(32).encode()
        return cls(secret, settings.file_url_ttl_s)

    def _mac(self, *parts: str) -> str:
        return hmac.new(self._secret, "\n".join(parts).encode(), hashlib.sha256).hexdigest()

    def derive_key(self, purpose: str) -> bytes:
        """A 32-byte key for another use of the same kept secret (webhook signing: serving/webhooks.py), so that
        every replica sharing the secret, and this process after a restart, derive the same one."""
        return hmac.new(self._secret, f"derive\n{purpose}".encode(), hashlib.sha256).digest()

    def expiry(self) -> int:
        """When a URL signed now stops working (unix seconds): ``ttl_s`` from now, rounded up to a step of 1/24 of
        it, so that the same file read twice in a while (a poll, an event-stream replay) has the same URL, which
        clients and caches can keep. Never more than ``ttl_s`` + 1/24 of it."""
        step = max(1, int(self.ttl_s // 24))
        return -(-int(self.clock() + self.ttl_s) // step) * step

    def sign(self, path: str, expires: int | None = None) -> str:
        """``path?exp=...&sig=...``"""
        exp = self.expiry() if expires is None else int(expires)
        return f"{path}?exp={exp}&sig={self._mac('file', path, str(exp))}"

    def check(self, path: str, exp: str, sig: str) -> str:
        """``"valid"``, ``"expired"`` (a signature we made, now past its time) or ``"invalid"``."""
        if not (exp.isascii() and exp.isdigit() and len(exp) <= 12):
            return "invalid"
        if not hmac.compare_digest(sig.encode(), self._mac("file", path, exp).encode()):
            return "invalid"
        return "valid" if self.clock() < int(exp) else "expired"

    # upload tokens: <random hex>_<tag>, where the tag binds the owner; checking needs no state and survives restarts
    def upload_token(self, owner: str) -> str:
        nonce = secrets.token_hex(16)
        return f"{nonce}_{self._mac('upload', owner, nonce)[:16]}"

    def sign_upload(self, api: str, name: str, expires: int) -> str:
        """The signature of a presigned upload (one PUT of ``name`` through ``api``'s route until ``expires``): the
        ticket lives in the URL, so any replica sharing the secret takes the PUT."""
        return self._mac("upload-put", api, name, str(int(expires)))

    def check_upload(self, api: str, name: str, expires: str, sig: str) -> str:
        """``"valid"``, ``"expired"`` or ``"invalid"`` for a presigned upload URL's ``exp`` and ``sig``."""
        if not (expires.isascii() and expires.isdigit() and len(expires) <= 12):
            return "invalid"
        if not hmac.compare_digest(sig.encode(), self.sign_upload(api, name, int(expires)).encode()):
            return "invalid"
        return "expired" if int(expires) < self.clock() else "valid"

    def owns_upload(self, token: str, owner: str) -> bool:
        nonce, _, tag = token.partition("_")
        return bool(tag) and hmac.compare_digest(tag.encode(), self._mac("upload", owner, nonce)[:16].encode())


# -------------------------------------------------------------------------------------------------- opening


def open_stored(folder: Path, name: str, subfolder: str | None = None) -> tuple[int, os.stat_result] | None:
    """An open descriptor (and its stat) of the regular, non-empty file ``[subfolder/]name`` in ``folder``, or None.

    No link is followed below ``folder`` (the operator's configured folder may itself be one): each component is
    opened relative to its parent's descriptor with O_NOFOLLOW, so a link planted as the file or as the
    subfolder, or swapped in between a check and the open, is never read through. O_NONBLOCK keeps a planted FIFO
    from blocking the open. ``name`` must already be a validated plain name (no "/")."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    opened: list[int] = []
    try:
        opened.append(os.open(folder, os.O_RDONLY | os.O_DIRECTORY))
        if subfolder is not None:
            opened.append(os.open(subfolder, flags | os.O_DIRECTORY, dir_fd=opened[-1]))
        fd = os.open(name, flags, dir_fd=opened[-1])
    except OSError:  # absent, a link (ELOOP), not a folder, no permission: not served
        return None
    finally:
        for dir_fd in opened:
            os.close(dir_fd)
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_size == 0:  # an empty file: an upload ticket not yet PUT
        os.close(fd)
        return None
    return fd, info


def read_stored(folder: Path, name: str) -> bytes | None:
    """The whole of a stored file (see :func:`open_stored`), or None."""
    found = open_stored(folder, name)
    if found is None:
        return None
    fd, info = found
    with os.fdopen(fd, "rb") as file:
        return file.read()


def _byte_range(header: str | None, size: int) -> tuple[int, int] | None | str:
    """One ``Range: bytes=`` range as (start, end exclusive); None: send the whole file (absent, several ranges, or
    unparsable, which RFC 9110 lets a server ignore); ``"unsatisfiable"`` for a 416."""
    if not header or not header.startswith("bytes=") or "," in header:
        return None
    first, _, last = header[6:].strip().partition("-")
    try:
        if not first:  # the last N bytes
            count = int(last)
            return (max(0, size - count), size) if count > 0 else "unsatisfiable"
        start = int(first)
        end = min(int(last) + 1, size) if last else size
    except ValueError:
        return None
    if start >= size or end <= start:
        return "unsatisfiable"
    return start, end


def _serve_range(headers, range_header: str | None, size: int) -> tuple[int, int, int]:
    """(start, end exclusive, status) of the bytes a response sends for ``Range: range_header`` of ``size`` bytes:
    200 whole, 206 one range, 416 none; sets ``content-range`` and ``content-length`` in ``headers``."""
    start, end, status = 0, size, 200
    wanted = _byte_range(range_header, size)
    if wanted == "unsatisfiable":
        status, end = 416, 0
        headers["content-range"] = f"bytes */{size}"
    elif wanted is not None:
        status = 206
        start, end = wanted
        headers["content-range"] = f"bytes {start}-{end - 1}/{size}"
    headers["content-length"] = str(end - start)
    return start, end, status


class StoredFileResponse(Response):
    """Streams an already opened file descriptor (closed when done), with single byte ranges (video players seek
    with them). Starlette's FileResponse opens its path again, which would follow a link swapped in meanwhile."""

    def __init__(self, fd: int, info: os.stat_result, range_header: str | None, headers: dict[str, str]) -> None:
        super().__init__(status_code=200, headers={**headers, "accept-ranges": "bytes"})
        self.fd = fd
        self.start, self.end, self.status_code = _serve_range(self.headers, range_header, info.st_size)

    async def __call__(self, scope, receive, send) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            position = self.start
            while position < self.end:
                chunk = await asyncio.to_thread(os.pread, self.fd, min(READ_CHUNK, self.end - position), position)
                if not chunk:  # truncated under us: end the body short rather than spin
                    break
                position += len(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": position < self.end})
            if position == self.start or position < self.end:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            os.close(self.fd)


class StoredObjectResponse(Response):
    """Streams an object of the output store (an open ``serving.outputs.OutputReader``, closed when done) with single
    byte ranges, as :class:`StoredFileResponse` does a file: API replicas serve S3-held outputs through their own
    signed URLs, so clients never need to reach the object store."""

    def __init__(self, reader, range_header: str | None, headers: dict[str, str]) -> None:
        super().__init__(status_code=200, headers={**headers, "accept-ranges": "bytes"})
        self.reader = reader
        self.start, self.end, self.status_code = _serve_range(self.headers, range_header, reader.size)

    async def __call__(self, scope, receive, send) -> None:
        pieces = self.reader.iter_bytes(self.start, self.end) if self.end > self.start else iter(())
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            while (piece := await asyncio.to_thread(next, pieces, None)) is not None:
                await send({"type": "http.response.body", "body": piece, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await asyncio.to_thread(self.reader.close)


def _open_object(output_store, name: str):
    """(reader, kind) of an object, or None when there is none (or the store cannot be read now: a 404 rather than
    a 5xx, and the store's error is logged)."""
    try:
        reader = output_store.open(name)
    except Exception as exc:  # noqa: BLE001 - serving.outputs.OutputStoreError, one line
        log.warning("could not read %s from %s: %s", name, output_store.location, exc)
        return None
    if reader is None:
        return None
    try:
        return reader, sniff_media(reader.head())
    except Exception as exc:  # noqa: BLE001
        reader.close()
        log.warning("could not read %s from %s: %s", name, output_store.location, exc)
        return None


# --------------------------------------------------------------------------------------------------- routes


def _not_found() -> JSONResponse:
    return JSONResponse({"detail": "not found"}, status_code=404)


def _forbidden(message: str) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=403)


def caller_owner(ctx: "ServerContext", request: Request) -> str | None:
    """The tenant of a valid API key in ``Authorization`` (``Bearer <key>`` or fal's ``Key <key>``); None when
    there is none or it is not one of ours."""
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    key = key.strip()
    if scheme.lower() not in ("bearer", "key") or not key or not ctx.key_is_valid(key):
        return None
    return ctx.owner_of(key)


def _signature_verdict(ctx: "ServerContext", request: Request, path: str) -> str | None:
    """None without signature parameters, else :meth:`FileSigner.check`'s verdict."""
    exp, sig = request.query_params.get("exp"), request.query_params.get("sig")
    if exp is None and sig is None:
        return None
    return ctx.signer.check(path, exp or "", sig or "")


def _input_owned_by(ctx: "ServerContext", name: str, owner: str) -> bool:
    """Whether one of ``owner``'s jobs (the latest 1,000) reads the stored input ``name``."""
    for job in ctx.store.list(limit=1000, owner=owner):
        if any(p and Path(p).name == name for p in (job.params.image_path, job.params.video_path)):
            return True
    return False


def _headers(name: str, kind: MediaKind | None) -> dict[str, str]:
    # media plays inline (the playground's <video>); anything else is a download, never rendered from our origin
    disposition = "inline" if kind is not None else "attachment"
    return {
        "content-type": kind.content_type if kind is not None else "application/octet-stream",
        "content-disposition": f'{disposition}; filename="{name}"',
        "x-content-type-options": "nosniff",
        "content-security-policy": "default-src 'none'; sandbox",
        "cache-control": "private",  # owner-only content: no shared cache keeps it
    }


def _open_and_describe(folder: Path, name: str, subfolder: str | None):
    found = open_stored(folder, name, subfolder)
    if found is None:
        return None
    fd, info = found
    try:
        return fd, info, sniff_media(os.pread(fd, SNIFF_BYTES, 0))
    except OSError:
        os.close(fd)
        return None


def add_file_routes(app: FastAPI, ctx: "ServerContext") -> None:
    """The file routes of a listener (every listener serves every file: fal hands its outputs out on its own)."""

    async def serve(request: Request, name: str, path: str, owned: Callable[[str], bool],
                    subfolder: str | None) -> Response:
        owner = caller_owner(ctx, request) if ctx.settings.api_keys else None
        # the owner's key reads its files whatever the URL carries (an expired link is not a revoked file)
        if owner is None or not await asyncio.to_thread(owned, owner):
            verdict = _signature_verdict(ctx, request, path)
            if verdict == "invalid":
                return _forbidden("invalid signature")
            if verdict == "expired":
                return _forbidden("this link has expired; fetch the job's result again for a fresh one")
            if verdict is None and ctx.settings.api_keys:
                return _not_found()  # another tenant's file looks exactly like a missing one
        if subfolder is None and ctx.output_store is not None:  # outputs and previews live in the object store
            opened = await asyncio.to_thread(_open_object, ctx.output_store, name)
            if opened is None:
                return _not_found()
            reader, kind = opened
            return StoredObjectResponse(reader, request.headers.get("range"), _headers(name, kind))
        found = await asyncio.to_thread(_open_and_describe, ctx.outputs_dir, name, subfolder)
        if found is None and subfolder == "uploads" and ctx.output_store is not None:
            # taken by another replica (each has a folder of its own): the object store holds the shared copy
            opened = await asyncio.to_thread(_open_object, ctx.output_store, f"uploads/{name}")
            if opened is not None:
                reader, kind = opened
                return StoredObjectResponse(reader, request.headers.get("range"), _headers(name, kind))
        if found is None:
            return _not_found()
        fd, info, kind = found
        return StoredFileResponse(fd, info, request.headers.get("range"), _headers(name, kind))

    @app.get("/files/uploads/{name}", summary="An upload or stored input image (owner or signed URL)")
    async def upload_file(name: str, request: Request):
        if not UPLOAD_NAME.fullmatch(name):
            return _not_found()
        stem = name.split(".", 1)[0]

        def owned(owner: str) -> bool:
            if name.startswith("input-"):
                return _input_owned_by(ctx, name, owner)
            return ctx.signer.owns_upload(stem, owner)

        return await serve(request, name, f"/files/uploads/{name}", owned, "uploads")

    @app.get("/files/{name}", summary="A job's output video or chunk preview (owner or signed URL)")
    async def output_file(name: str, request: Request):
        # names come from job ids we generated: never join a client string into a path without this check
        if not OUTPUT_NAME.fullmatch(name):
            return _not_found()

        def owned(owner: str) -> bool:
            job = ctx.store.get(name[:32], owner=owner)
            return job is not None

        return await serve(request, name, f"/files/{name}", owned, None)
