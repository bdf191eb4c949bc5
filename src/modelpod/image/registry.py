"""A small OCI distribution (v2) client on the standard library: pull and push manifests and blobs.

Facts relied on (distribution-spec v1.1): ``HEAD /v2/<name>/blobs/<digest>`` answers 200 when the
blob exists; an upload starts with ``POST /v2/<name>/blobs/uploads/`` (202 + ``Location``), or with
``?mount=<digest>&from=<repo>`` which answers 201 when the registry mounted the blob and 202 (a
normal session) when it did not; chunks go by ``PATCH`` with ``Content-Range: start-end``
(inclusive) and the upload closes with ``PUT <location>?digest=``; manifests are ``PUT`` with
their media type as ``Content-Type``. Auth follows the ``WWW-Authenticate`` challenge of a 401:
``Basic`` or ``Bearer realm=…,service=…,scope=…`` (a token from the realm, with basic credentials
when we have them). Plain http is used only for loopback registries.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import re
import ssl
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit, urlunsplit

from modelpod import __version__
from modelpod.errors import IntegrityError, RegistryError, UsageError
from modelpod.image.oci import INDEXES, MANIFESTS, BlobStore, Descriptor, sha256_digest
from modelpod.image.progress import Progress, Silent

DOCKER_HUB = "docker.io"
_DOCKER_HUB_API = "registry-1.docker.io"
LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})
_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_ACCEPT = ", ".join((*MANIFESTS, *INDEXES))
_REDIRECTS = (301, 302, 303, 307, 308)


class RegistryHTTPError(RegistryError):
    """The registry answered with an unexpected status; ``status`` lets callers tell 404 apart."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Reference:
    """``registry/repository[:tag][@digest]``, normalised the way docker does."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, text: str) -> Reference:
        rest, _, digest = text.partition("@")
        if digest and not _DIGEST.fullmatch(digest):
            raise UsageError(f"bad image reference {text!r}: digest must be sha256:<64 hex>")
        first, slash, after = rest.partition("/")
        if slash and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
            registry, path = first, after
        else:
            registry, path = DOCKER_HUB, rest
        tag = None
        last = path.rsplit("/", 1)[-1]
        if ":" in last:
            path, _, tag = path.rpartition(":")
            if not _TAG.fullmatch(tag):
                raise UsageError(f"bad image reference {text!r}: bad tag {tag!r}")
        if registry == DOCKER_HUB and "/" not in path:
            path = f"library/{path}"
        if not path or not all(_COMPONENT.fullmatch(c) for c in path.split("/")):
            raise UsageError(
                f"bad image reference {text!r}: repository names are lowercase letters, digits and . _ - separated by /"
            )
        return cls(registry, path, tag, digest or None)

    @property
    def reference(self) -> str:
        """What goes after ``/manifests/``: the digest when pinned, else the tag (default latest)."""
        return self.digest or self.tag or "latest"

    @property
    def host(self) -> str:
        return _DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    def with_tag(self, tag: str) -> Reference:
        return Reference(self.registry, self.repository, tag, None)

    def __str__(self) -> str:
        out = f"{self.registry}/{self.repository}"
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out


def hostname(netloc: str) -> str:
    """The host part of ``host[:port]`` / ``[v6]:port``, without brackets."""
    if netloc.startswith("["):
        return netloc[1:].partition("]")[0]
    return netloc.rsplit(":", 1)[0] if netloc.count(":") == 1 else netloc


def is_loopback(netloc: str) -> bool:
    return hostname(netloc) in LOOPBACK


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = field(repr=False)

    def basic(self) -> str:
        return "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode()


@dataclass
class Transfers:
    """What a client did, counted: the tests (and --json) read these."""

    uploaded: int = 0
    mounted: int = 0
    existing: int = 0
    downloaded: int = 0
    bytes_uploaded: int = 0
    bytes_downloaded: int = 0

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


Body = bytes | Callable[[], IO[bytes]] | None


class Registry:
    """One registry host. Not thread-safe; cheap to make."""

    def __init__(self, host: str, *, credentials: Credentials | None = None, timeout_s: float = 60.0,
                 chunk_bytes: int = 64 * 1024 * 1024, progress: Progress | None = None) -> None:
        self.host = host
        self.scheme = "http" if is_loopback(host) else "https"
        self.base = f"{self.scheme}://{host}"
        self.credentials = credentials
        self.timeout_s = timeout_s
        self.chunk_bytes = chunk_bytes
        self.progress = progress or Silent()
        self.transfers = Transfers()
        self._basic = False
        self._tokens: dict[tuple[str, ...], str] = {}

    # -- manifests ------------------------------------------------------------------------------
    def get_manifest(self, repo: str, reference: str) -> tuple[bytes, str]:
        """The manifest (or index) bytes and media type; a digest reference is verified."""
        status, headers, body = self._call("GET", f"/v2/{repo}/manifests/{reference}", _pull(repo),
                                           headers={"Accept": _ACCEPT}, ok=(200,))
        if reference.startswith("sha256:") and sha256_digest(body) != reference:
            raise IntegrityError(f"{self.host}/{repo}@{reference[:19]}…: manifest does not match its digest")
        media = (headers.get("Content-Type") or "").split(";")[0].strip()
        try:
            media = json.loads(body).get("mediaType") or media
        except ValueError:
            raise RegistryError(f"{self.host}/{repo}:{reference}: the manifest is not JSON") from None
        return body, media

    def put_manifest(self, repo: str, reference: str, data: bytes, media_type: str) -> str:
        return self.put_manifest_subject(repo, reference, data, media_type)[0]

    def put_manifest_subject(self, repo: str, reference: str, data: bytes, media_type: str) -> tuple[str, str | None]:
        """Put a manifest; (its digest, the ``OCI-Subject`` header a referrers-aware registry answers)."""
        _, headers, _ = self._call("PUT", f"/v2/{repo}/manifests/{reference}", _push(repo),
                                   headers={"Content-Type": media_type}, body=data, length=len(data), ok=(201,))
        return sha256_digest(data), headers.get("OCI-Subject")

    def get_referrers(self, repo: str, digest: str) -> bytes | None:
        """The referrers index of ``digest`` (distribution-spec v1.1), or None when the registry
        has no referrers API (404)."""
        status, headers, body = self._call("GET", f"/v2/{repo}/referrers/{digest}", _pull(repo),
                                           headers={"Accept": INDEXES[0]}, ok=(200, 404))
        media = (headers.get("Content-Type") or "").split(";")[0].strip()
        if status == 404 or media not in ("", INDEXES[0]):
            return None
        return body

    # -- blobs ----------------------------------------------------------------------------------
    def has_blob(self, repo: str, digest: str) -> bool:
        status, _, _ = self._call("HEAD", f"/v2/{repo}/blobs/{digest}", _pull(repo), ok=(200, 404))
        return status == 200

    def fetch_blob(self, repo: str, desc: Descriptor, store: BlobStore, label: str = "") -> Path:
        """Download a blob into ``store`` (skipped when cached), verifying size and digest."""
        if store.has(desc.digest):
            return store.path(desc.digest)
        conn, resp = self._send("GET", f"/v2/{repo}/blobs/{desc.digest}", _pull(repo), {}, None, None)
        try:
            if resp.status != 200:
                raise self._error("GET", f"/v2/{repo}/blobs/{desc.digest}", resp.status, resp.read())
            task = self.progress.task(label or f"pull {desc.digest[7:19]}", desc.size)
            h, size = hashlib.sha256(), 0
            with store.writer() as w:
                while block := resp.read(1 << 20):
                    h.update(block)
                    w.write(block)
                    size += len(block)
                    task.advance(len(block))
                got = "sha256:" + h.hexdigest()
                if got != desc.digest or size != desc.size:
                    raise IntegrityError(f"{self.host}/{repo}: blob {desc.digest[:19]}… arrived as {got[:19]}… "
                                         f"({size} bytes, expected {desc.size})")
                path = w.finish(got)
            task.done()
        finally:
            conn.close()
        self.transfers.downloaded += 1
        self.transfers.bytes_downloaded += size
        return path

    def push_blob(self, repo: str, desc: Descriptor, path: Path, mount_from: Iterable[str] = (),
                  label: str = "") -> str:
        """Make ``desc`` exist in ``repo``: 'existing', 'mounted' or 'uploaded'."""
        if self.has_blob(repo, desc.digest):
            self.transfers.existing += 1
            return "existing"
        location, min_chunk = None, 0
        for source in (s for s in mount_from if s != repo):
            query = urlencode({"mount": desc.digest, "from": source})
            status, headers, _ = self._call("POST", f"/v2/{repo}/blobs/uploads/?{query}",
                                            (*_push(repo), f"repository:{source}:pull"), ok=(201, 202))
            if status == 201:
                self.transfers.mounted += 1
                return "mounted"
            location, min_chunk = headers.get("Location"), int(headers.get("OCI-Chunk-Min-Length") or 0)
            break
        if location is None:
            _, headers, _ = self._call("POST", f"/v2/{repo}/blobs/uploads/", _push(repo), ok=(202,))
            location, min_chunk = headers.get("Location"), int(headers.get("OCI-Chunk-Min-Length") or 0)
        if not location:
            raise RegistryError(f"{self.host}/{repo}: the registry opened an upload without a Location")
        task = self.progress.task(label or f"push {desc.digest[7:19]}", desc.size)
        chunk = max(self.chunk_bytes, min_chunk)
        if desc.size <= chunk:
            self._call("PUT", _with_digest(location, desc.digest), _push(repo),
                       headers={"Content-Type": "application/octet-stream"},
                       body=_window(path, 0, desc.size, task), length=desc.size, ok=(201,))
        else:
            for start in range(0, desc.size, chunk):
                n = min(chunk, desc.size - start)
                _, headers, _ = self._call(
                    "PATCH", location, _push(repo),
                    headers={"Content-Type": "application/octet-stream", "Content-Range": f"{start}-{start + n - 1}"},
                    body=_window(path, start, n, task), length=n, ok=(202,),
                )
                location = headers.get("Location") or location
            self._call("PUT", _with_digest(location, desc.digest), _push(repo), body=b"", length=0, ok=(201,))
        task.done()
        self.transfers.uploaded += 1
        self.transfers.bytes_uploaded += desc.size
        return "uploaded"

    # -- HTTP -----------------------------------------------------------------------------------
    def _call(self, method: str, target: str, scopes: tuple[str, ...], *, headers: Mapping[str, str] | None = None,
              body: Body = None, length: int | None = None, ok: tuple[int, ...] = (200,)
              ) -> tuple[int, http.client.HTTPMessage, bytes]:
        conn, resp = self._send(method, target, scopes, dict(headers or {}), body, length)
        try:
            data = resp.read()
        finally:
            conn.close()
        if resp.status not in ok:
            raise self._error(method, target, resp.status, data)
        return resp.status, resp.headers, data

    def _send(self, method: str, target: str, scopes: tuple[str, ...], headers: dict[str, str], body: Body,
              length: int | None) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """Send with auth; on a 401 answer the challenge once and send again."""
        for attempt in (1, 2):
            auth = self._authorization(scopes)
            sent = {**headers, **({"Authorization": auth} if auth else {})}
            conn, resp = self._http(method, urljoin(self.base, target), sent, body, length)
            if resp.status != 401 or attempt == 2:
                if resp.status in (401, 403):
                    detail = _error_text(resp.read())
                    conn.close()
                    why = "authentication failed" if resp.status == 401 else "access denied"
                    raise RegistryHTTPError(f"registry {self.host}: {why} for {method} {_path(target)}{detail}",
                                            resp.status)
                return conn, resp
            challenge = resp.getheader("WWW-Authenticate") or ""
            resp.read()
            conn.close()
            self._login(challenge, scopes)
        raise AssertionError("unreachable")

    def _http(self, method: str, url: str, headers: dict[str, str], body: Body, length: int | None
              ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        for _ in range(6):
            parts = urlsplit(url)
            if parts.scheme == "http" and not is_loopback(parts.netloc):
                raise RegistryError(f"refusing plain http to {parts.netloc}: only loopback registries may skip TLS")
            conn: http.client.HTTPConnection
            if parts.scheme == "https":
                conn = http.client.HTTPSConnection(parts.netloc, timeout=self.timeout_s,
                                                   context=ssl.create_default_context())
            else:
                conn = http.client.HTTPConnection(parts.netloc, timeout=self.timeout_s)
            sent = {"User-Agent": f"modelpod/{__version__}", **headers}
            if length is not None:
                sent["Content-Length"] = str(length)
            payload = body() if callable(body) else body
            try:
                conn.request(method, urlunsplit(("", "", parts.path or "/", parts.query, "")), body=payload,
                             headers=sent, encode_chunked=False)
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                raise RegistryError(f"cannot reach registry {self.host}: {type(exc).__name__}: {exc}") from None
            finally:
                if payload is not None and not isinstance(payload, bytes):
                    payload.close()
            if resp.status in _REDIRECTS and method in ("GET", "HEAD") and resp.getheader("Location"):
                new = urljoin(url, resp.getheader("Location") or "")
                resp.read()
                conn.close()
                if urlsplit(new).netloc != urlsplit(url).netloc:
                    # Blob storage behind a redirect (S3, a CDN) rejects our registry credentials.
                    headers = {k: v for k, v in headers.items() if k != "Authorization"}
                url = new
                continue
            return conn, resp
        raise RegistryError(f"registry {self.host}: too many redirects for {method} {_path(url)}")

    # -- auth -----------------------------------------------------------------------------------
    def _authorization(self, scopes: tuple[str, ...]) -> str | None:
        if self._basic and self.credentials:
            return self.credentials.basic()
        token = self._tokens.get(tuple(sorted(scopes)))
        return f"Bearer {token}" if token else None

    def _login(self, challenge: str, scopes: tuple[str, ...]) -> None:
        scheme, params = parse_challenge(challenge)
        if scheme == "basic":
            if self.credentials is None:
                raise RegistryError(f"registry {self.host} needs a user name and password (basic auth): "
                                    "set MODELPOD_REGISTRY_USERNAME and MODELPOD_REGISTRY_PASSWORD or docker login")
            self._basic = True
            return
        if scheme != "bearer" or "realm" not in params:
            raise RegistryError(f"registry {self.host}: unsupported auth challenge {challenge!r}")
        realm = urlsplit(params["realm"])
        if realm.scheme not in ("http", "https") or (realm.scheme == "http" and not is_loopback(realm.netloc)):
            raise RegistryError(f"registry {self.host}: refusing token realm {params['realm']!r} (not https)")
        wanted = merge_scopes([*params.get("scope", "").split(), *scopes])
        query = [("service", params["service"])] if params.get("service") else []
        query += [("scope", s) for s in wanted]
        headers = {"Authorization": self.credentials.basic()} if self.credentials else {}
        query_text = urlencode([*parse_qsl(realm.query), *query])
        url = urlunsplit((realm.scheme, realm.netloc, realm.path or "/", query_text, ""))
        conn, resp = self._http("GET", url, headers, None, None)
        try:
            data = resp.read()
        finally:
            conn.close()
        if resp.status != 200:
            raise RegistryHTTPError(f"registry {self.host}: the token service {realm.netloc} refused us "
                                    f"(HTTP {resp.status}){_error_text(data)}", resp.status)
        try:
            reply = json.loads(data)
            token = str(reply.get("token") or reply.get("access_token") or "")
        except (ValueError, AttributeError):
            token = ""
        if not token:
            raise RegistryError(f"registry {self.host}: the token service {realm.netloc} sent no token")
        self._tokens[tuple(sorted(scopes))] = token

    def _error(self, method: str, target: str, status: int, body: bytes) -> RegistryHTTPError:
        return RegistryHTTPError(f"registry {self.host}: {method} {_path(target)} answered {status}{_error_text(body)}",
                                 status)


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="…",service="…"`` -> ("bearer", {...})."""
    scheme, _, rest = header.strip().partition(" ")
    params = {k.lower(): (q if q or not u else u) for k, q, u in re.findall(r'(\w+)=(?:"([^"]*)"|([^,\s]*))', rest)}
    return scheme.lower(), params


def merge_scopes(scopes: Iterable[str]) -> list[str]:
    """One ``type:name:actions`` per resource, actions united and sorted (challenges repeat ours)."""
    merged: dict[tuple[str, str], set[str]] = {}
    for scope in scopes:
        kind, _, rest = scope.partition(":")
        name, _, actions = rest.rpartition(":")
        if kind and name:
            merged.setdefault((kind, name), set()).update(a for a in actions.split(",") if a)
    return [f"{kind}:{name}:{','.join(sorted(actions))}" for (kind, name), actions in sorted(merged.items())]


def _pull(repo: str) -> tuple[str, ...]:
    return (f"repository:{repo}:pull",)


def _push(repo: str) -> tuple[str, ...]:
    return (f"repository:{repo}:pull,push",)


def _path(target: str) -> str:
    return urlsplit(target).path


def _with_digest(location: str, digest: str) -> str:
    parts = urlsplit(location)
    query = urlencode([*parse_qsl(parts.query, keep_blank_values=True), ("digest", digest)])
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))


def _error_text(body: bytes) -> str:
    """The registry's own words (its JSON ``errors`` list), briefly."""
    try:
        errors: list[dict[str, Any]] = json.loads(body).get("errors") or []
        words = "; ".join(f"{e.get('code', '')} {e.get('message', '')}".strip() for e in errors)
    except (ValueError, AttributeError):
        words = body[:200].decode("utf-8", "replace").strip()
    return f": {words}" if words else ""


class _Window:
    """``length`` bytes of a file from ``start``, read in blocks by http.client, counted."""

    def __init__(self, path: Path, start: int, length: int, task: Any) -> None:
        self.fh = path.open("rb")
        self.fh.seek(start)
        self.left = length
        self.task = task

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        data = self.fh.read(n)
        self.left -= len(data)
        self.task.advance(len(data))
        return data

    def close(self) -> None:
        self.fh.close()


def _window(path: Path, start: int, length: int, task: Any) -> Callable[[], IO[bytes]]:
    return lambda: _Window(path, start, length, task)  # type: ignore[return-value]
