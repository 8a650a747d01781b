"""
The object cache: complete GetObject responses kept in memory, coherent across a fleet.

The gateway consults the cache only after the client's signature is verified:
:meth:`ObjectCache.lookup` takes the :class:`~proxy.sigv4.RequestAuth` of the request and
returns a Deferred that fires with one of

- :class:`Hit`: write it with :meth:`ObjectCache.serve` (handles Range, HEAD and conditionals);
- :class:`Miss`: forward the request, adding ``Miss.backend_headers``, and stream the backend
  response through ``Miss.fill`` (``start``, ``write``, ``finish`` or ``abort``). When
  ``fill.start()`` returns a :class:`Hit` (the backend returned 304 to a revalidation), drop
  the backend response and serve that hit instead;
- :class:`NotCacheable`: forward the request as if there were no cache.

Writes call :meth:`ObjectCache.invalidate` when they start and again when they complete; the
rules of what is cached, how GETs are counted and the coherence guarantees are in
``docs/cache.md`` and in the docstrings below.
"""

from __future__ import annotations

import calendar
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol
from urllib.parse import parse_qsl

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.web.http_headers import Headers

from proxy.cache_invalidation import InvalidationBus, LocalInvalidationBus
from proxy.errors import render_error
from proxy.sigv4 import PRESIGN_QUERY_PARAMETERS, RequestAuth

__all__ = [
    "ENTRY_OVERHEAD_BYTES",
    "CacheMetrics",
    "CacheRequest",
    "CacheSettings",
    "CachedObject",
    "Fill",
    "Hit",
    "Miss",
    "NotCacheable",
    "ObjectCache",
    "Outcome",
    "WebRequest",
    "entry_size",
]

ENTRY_OVERHEAD_BYTES = 512
"""Bytes charged per entry on top of its body, header and key bytes (dict slots, objects)."""

# Query parameters that do not change the response: the operation hint newer SDKs append, and
# the presigned-URL signature parameters.
_NEUTRAL_QUERY = PRESIGN_QUERY_PARAMETERS | {"x-id"}

# Request headers whose effect the cache cannot reproduce: SSE-C keys, requester-pays billing,
# the bucket-owner check, If-Range, and CORS (the response varies by Origin).
# x-amz-checksum-mode is not among them: botocore 1.36 and later send it on every GetObject, and
# a full-object checksum header that the cached response carries is valid for its 200 replay.
_BYPASS_HEADERS = (
    b"x-amz-server-side-encryption-customer-algorithm",
    b"x-amz-server-side-encryption-customer-key",
    b"x-amz-server-side-encryption-customer-key-md5",
    b"x-amz-request-payer",
    b"x-amz-expected-bucket-owner",
    b"if-range",
    b"origin",
)

# Response headers that describe one transfer, not the object; everything else is stored.
_TRANSFER_HEADERS = frozenset(
    {
        b"date",
        b"server",
        b"connection",
        b"keep-alive",
        b"transfer-encoding",
        b"te",
        b"trailer",
        b"upgrade",
        b"proxy-authenticate",
        b"content-length",
        b"content-range",
        b"accept-ranges",
        b"age",
        b"via",
        b"x-amz-request-id",
        b"x-amz-id-2",
        b"set-cookie",
    }
)

# S3 lists in Vary the request headers that its CORS evaluation depends on (Amazon S3 API
# reference, "Common Response Headers"). Requests with Origin are never cached, so responses that
# vary only by these request headers are the same for every GET the cache answers.
_CORS_VARY = frozenset(
    {b"origin", b"access-control-request-headers", b"access-control-request-method"}
)

# Headers a 304 response carries, following what S3 sends.
_NOT_MODIFIED_HEADERS = frozenset(
    {b"etag", b"last-modified", b"cache-control", b"expires", b"x-amz-version-id"}
)

_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")
_ENTITY_TAG_RE = re.compile(r'\s*(W/)?("[^"]*")\s*(?:,|$)')
_HTTP_DATE_RE = re.compile(
    r"^(Mon|Tue|Wed|Thu|Fri|Sat|Sun), (\d{2}) (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)"
    r" (\d{4}) (\d{2}):(\d{2}):(\d{2}) GMT$"
)
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")

EntryKey = tuple[str, str, str | None]
"""(bucket, key, versionId or None for the current version)."""

ObjectKey = tuple[str, str]
"""(bucket, key): the unit of invalidation, covering every version."""


# Protocols for the parts of Twisted interfaces used here: mypy without the zope.interface plugin
# cannot check calls through an Interface type. The reactor, task.Clock and
# twisted.web.server.Request match them.
class _DelayedCall(Protocol):
    def active(self) -> bool: ...

    def cancel(self) -> None: ...


class _Clock(Protocol):
    def seconds(self) -> float: ...

    def callLater(
        self, delay: float, callable: Callable[..., Any], *args: Any, **kw: Any
    ) -> _DelayedCall: ...


class WebRequest(Protocol):
    """The parts of ``twisted.web.server.Request`` that the cache reads and writes."""

    method: bytes
    uri: bytes
    requestHeaders: Headers
    responseHeaders: Headers

    def setResponseCode(self, code: int, message: bytes | None = None) -> None: ...

    def write(self, data: bytes) -> None: ...

    def finish(self) -> None: ...


class CacheSettings(Protocol):
    """The ``[cache]`` configuration section."""

    @property
    def enabled(self) -> bool: ...

    @property
    def max_bytes(self) -> int: ...

    @property
    def max_object_bytes(self) -> int: ...

    @property
    def ttl(self) -> float: ...


class _CounterHandle(Protocol):
    def inc(self, amount: float = 1) -> None: ...


class _GaugeHandle(Protocol):
    def set(self, value: float) -> None: ...


class CacheMetrics(Protocol):
    """The part of ``collector.Metrics`` that the cache records into."""

    @property
    def cache_hits_total(self) -> _CounterHandle: ...

    @property
    def cache_misses_total(self) -> _CounterHandle: ...

    @property
    def cache_bytes(self) -> _GaugeHandle: ...

    @property
    def cache_entries(self) -> _GaugeHandle: ...

    @property
    def cache_invalidations_unconfirmed_total(self) -> _CounterHandle: ...


# ---------------------------------------------------------------------------------------------
# The request side: which requests the cache may answer, and how.


@dataclass(frozen=True)
class CacheRequest:
    """
    A GetObject or HeadObject request as the cache sees it.

    :ivar method: ``"GET"`` or ``"HEAD"``; anything else is not cacheable.
    :ivar bucket: the bucket name, percent-decoded.
    :ivar key: the object key, percent-decoded.
    :ivar query: the raw query string without ``?``.
    :ivar headers: the request headers as received.
    """

    method: str
    bucket: str
    key: str
    query: bytes
    headers: Headers

    @classmethod
    def from_request(cls, request: WebRequest, bucket: str, key: str) -> CacheRequest:
        """Build the cache's view of a Twisted web request addressed to ``bucket``/``key``."""
        _path, _mark, query = request.uri.partition(b"?")
        return cls(request.method.decode("latin-1"), bucket, key, query, request.requestHeaders)


@dataclass(frozen=True)
class _ByteRange:
    """A single range from a ``Range`` header: ``first``-``last`` or the ``suffix`` last bytes."""

    first: int | None
    last: int | None
    suffix: int | None


@dataclass(frozen=True)
class _Conditions:
    """The conditional headers of a request, parsed; None where absent."""

    if_match: tuple[str, ...] | None = None
    if_none_match: tuple[str, ...] | None = None
    if_modified_since: int | None = None
    if_unmodified_since: int | None = None

    def present(self) -> bool:
        return (
            self.if_match is not None
            or self.if_none_match is not None
            or self.if_modified_since is not None
            or self.if_unmodified_since is not None
        )


@dataclass(frozen=True)
class _Shape:
    """A request that passed the cacheability checks."""

    method: Literal["GET", "HEAD"]
    entry_key: EntryKey
    byte_range: _ByteRange | None
    conditions: _Conditions

    @property
    def plain(self) -> bool:
        """Whether a backend response to it is the whole object (GET, no Range, no conditions)."""
        return self.method == "GET" and self.byte_range is None and not self.conditions.present()


def _single_header(headers: Headers, name: bytes) -> str | None:
    """Return a header's one value; raise ValueError if it is repeated."""
    values = headers.getRawHeaders(name)
    if values is None:
        return None
    if len(values) != 1:
        raise ValueError(f"repeated {name.decode()} header")
    return values[0].decode("latin-1")


def parse_range(value: str) -> _ByteRange:
    """
    Parse a ``Range`` header with exactly one byte range.

    :raises ValueError: several ranges, another unit, or a malformed range such as ``bytes=5-3``
        or ``bytes=-``; the cache passes these to the backend, which decides.
    """
    match = _RANGE_RE.match(value.strip())
    if match is None:
        raise ValueError(f"Range {value!r} is not a single byte range")
    first_text, last_text = match.groups()
    if not first_text:
        if not last_text:
            raise ValueError(f"Range {value!r} has neither start nor suffix length")
        return _ByteRange(None, None, int(last_text))
    first = int(first_text)
    last = int(last_text) if last_text else None
    if last is not None and last < first:
        raise ValueError(f"Range {value!r} ends before it starts")
    return _ByteRange(first, last, None)


def resolve_range(byte_range: _ByteRange, size: int) -> tuple[int, int] | None:
    """
    Return the inclusive (first, last) byte offsets of a range on an object of ``size`` bytes.

    Returns None when the range is unsatisfiable (416): a start at or beyond the end, or a
    suffix of length 0.
    """
    if byte_range.suffix is not None:
        if byte_range.suffix == 0 or size == 0:
            return None
        return max(0, size - byte_range.suffix), size - 1
    assert byte_range.first is not None
    if byte_range.first >= size:
        return None
    last = size - 1 if byte_range.last is None else min(byte_range.last, size - 1)
    return byte_range.first, last


def parse_entity_tags(value: str) -> tuple[str, ...]:
    """
    Parse an ``If-Match``/``If-None-Match`` value into entity tags, ``*`` as ``("*",)``.

    Weak tags keep their ``W/`` prefix.

    :raises ValueError: an unquoted or otherwise malformed tag.
    """
    text = value.strip()
    if text == "*":
        return ("*",)
    tags = []
    position = 0
    while position < len(text):
        match = _ENTITY_TAG_RE.match(text, position)
        if match is None or match.end() == position:
            raise ValueError(f"entity tag list {value!r} is malformed")
        weak, tag = match.groups()
        tags.append((weak or "") + tag)
        position = match.end()
    if not tags:
        raise ValueError(f"entity tag list {value!r} is empty")
    return tuple(tags)


def parse_http_date(value: str) -> int:
    """
    Parse an IMF-fixdate (``Sun, 06 Nov 1994 08:49:37 GMT``) into seconds since the epoch.

    :raises ValueError: any other format; the obsolete RFC 850 and asctime forms are rejected
        because the cache could not be sure to read them as S3 does.
    """
    match = _HTTP_DATE_RE.match(value.strip())
    if match is None:
        raise ValueError(f"HTTP date {value!r} is not in IMF-fixdate format")
    _weekday, day, month, year, hour, minute, second = match.groups()
    return calendar.timegm(
        (int(year), _MONTHS.index(month) + 1, int(day), int(hour), int(minute), int(second))
    )


def analyze_request(request: CacheRequest) -> _Shape:
    """
    Check that the cache may answer ``request`` and parse what it needs.

    :raises ValueError: the request is not cacheable; the message is the reason.
    """
    if request.method not in ("GET", "HEAD"):
        raise ValueError(f"method {request.method} is not GET or HEAD")
    if not request.key:
        raise ValueError("request has no object key")

    version_id: str | None = None
    pairs = parse_qsl(request.query.decode("latin-1"), keep_blank_values=True)
    for parameter, argument in pairs:
        if parameter == "versionId":
            if version_id is not None or not argument:
                raise ValueError("versionId is repeated or empty")
            version_id = argument
        elif parameter not in _NEUTRAL_QUERY:
            raise ValueError(f"query parameter {parameter!r} changes the response")

    headers = request.headers
    for name in _BYPASS_HEADERS:
        if headers.hasHeader(name):
            raise ValueError(f"request header {name.decode()} is present")
    for name in (b"cache-control", b"pragma"):
        for value in headers.getRawHeaders(name, []):
            if b"no-cache" in value.lower() or b"no-store" in value.lower():
                raise ValueError(f"request {name.decode()} asks for a fresh copy")

    range_value = _single_header(headers, b"range")
    byte_range = parse_range(range_value) if range_value is not None else None
    conditions = _parse_conditions(headers)
    method: Literal["GET", "HEAD"] = "GET" if request.method == "GET" else "HEAD"
    return _Shape(method, (request.bucket, request.key, version_id), byte_range, conditions)


def _parse_conditions(headers: Headers) -> _Conditions:
    if_match = _single_header(headers, b"if-match")
    if_none_match = _single_header(headers, b"if-none-match")
    if_modified_since = _single_header(headers, b"if-modified-since")
    if_unmodified_since = _single_header(headers, b"if-unmodified-since")
    return _Conditions(
        if_match=parse_entity_tags(if_match) if if_match is not None else None,
        if_none_match=parse_entity_tags(if_none_match) if if_none_match is not None else None,
        if_modified_since=(
            parse_http_date(if_modified_since) if if_modified_since is not None else None
        ),
        if_unmodified_since=(
            parse_http_date(if_unmodified_since) if if_unmodified_since is not None else None
        ),
    )


def evaluate_conditions(
    conditions: _Conditions, etag: str, last_modified: int | None
) -> Literal[200, 304, 412]:
    """
    Evaluate conditional headers against an object, in the order of RFC 9110 section 13.2.2.

    If-Match (strong comparison) takes precedence over If-Unmodified-Since, and If-None-Match
    (weak comparison) over If-Modified-Since, which is also how S3 combines them.

    :raises ValueError: a date condition on an object without Last-Modified.
    """
    if conditions.if_match is not None:
        if not _strong_match(conditions.if_match, etag):
            return 412
    elif conditions.if_unmodified_since is not None:
        if last_modified is None:
            raise ValueError("If-Unmodified-Since on an object without Last-Modified")
        if last_modified > conditions.if_unmodified_since:
            return 412

    if conditions.if_none_match is not None:
        if _weak_match(conditions.if_none_match, etag):
            return 304
    elif conditions.if_modified_since is not None:
        if last_modified is None:
            raise ValueError("If-Modified-Since on an object without Last-Modified")
        if last_modified <= conditions.if_modified_since:
            return 304
    return 200


def _strong_match(tags: tuple[str, ...], etag: str) -> bool:
    if tags == ("*",):
        return True
    return not etag.startswith("W/") and etag in tags


def _weak_match(tags: tuple[str, ...], etag: str) -> bool:
    if tags == ("*",):
        return True
    opaque = etag.removeprefix("W/")
    return any(tag.removeprefix("W/") == opaque for tag in tags)


# ---------------------------------------------------------------------------------------------
# Entries and outcomes.


@dataclass
class CachedObject:
    """
    One cached 200 GetObject response.

    :ivar headers: the response headers to replay, transfer headers removed, in backend order.
    :ivar etag: the ``ETag`` value with its quotes.
    :ivar last_modified: ``Last-Modified`` in seconds since the epoch, or None if absent or not
        an IMF-fixdate.
    :ivar validated_at: reactor time in seconds when the backend last confirmed the bytes.
    :ivar size: the bytes charged against ``max_bytes``, see :func:`entry_size`.
    """

    entry_key: EntryKey
    headers: list[tuple[bytes, bytes]]
    body: bytes
    etag: str
    last_modified: int | None
    validated_at: float
    size: int


def entry_size(
    entry_key: EntryKey, headers: Sequence[tuple[bytes, bytes]], body_length: int
) -> int:
    """Return the bytes an entry is charged: body, header and key bytes plus the fixed overhead."""
    bucket, key, version_id = entry_key
    header_bytes = sum(len(name) + len(value) for name, value in headers)
    key_bytes = len(bucket.encode()) + len(key.encode()) + len((version_id or "").encode())
    return body_length + header_bytes + key_bytes + ENTRY_OVERHEAD_BYTES


@dataclass(frozen=True)
class Hit:
    """
    A response the cache writes itself with :meth:`ObjectCache.serve`.

    :ivar status: 200, 206, 304, 412 or 416.
    :ivar byte_range: the inclusive offsets for 206.
    """

    entry: CachedObject
    method: Literal["GET", "HEAD"]
    status: int
    byte_range: tuple[int, int] | None = None


@dataclass(frozen=True)
class Miss:
    """
    A request the gateway forwards, streaming the backend response through ``fill``.

    :ivar backend_headers: headers to add to the backend request before signing it. It contains
        ``If-None-Match`` when the request revalidates a stale entry.
    """

    fill: Fill
    backend_headers: Mapping[bytes, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class NotCacheable:
    """A request the cache does not take part in; ``reason`` is the cause, for debug logs."""

    reason: str


Outcome = Hit | Miss | NotCacheable


# ---------------------------------------------------------------------------------------------
# Fills and coalescing.


class Fill:
    """
    Receives one backend response and stores it if it is cacheable.

    The gateway calls :meth:`start` with the status and headers, :meth:`write` for each body
    chunk and then exactly one of :meth:`finish` (the whole body arrived) or :meth:`abort`
    (anything else). Each method is cheap and never raises for a response that is not
    cacheable; that response is simply not stored.
    """

    def __init__(
        self,
        cache: ObjectCache,
        shape: _Shape,
        flight: _Flight | None,
        revalidating: CachedObject | None,
        storing: bool,
    ) -> None:
        self._cache = cache
        self._shape = shape
        self._flight = flight
        self._revalidating = revalidating
        self._storing = storing
        self._token = cache._begin_fill(shape.entry_key) if storing else None
        self._headers: list[tuple[bytes, bytes]] = []
        self._chunks: list[bytes] = []
        self._received = 0
        self._reserved = 0
        self._expected_length: int | None = None
        self._etag = ""
        self._last_modified: int | None = None
        self._accepted = False
        self._done = False

    def start(self, status: int, headers: Headers) -> Hit | None:
        """
        Take the status and headers of the backend response.

        :return: None to forward the backend response as usual; a :class:`Hit` when a
            revalidation came back 304, in which case the gateway discards the backend response
            and writes the hit with :meth:`ObjectCache.serve`.
        """
        if self._done:
            return None
        if self._revalidating is not None:
            entry, self._revalidating = self._revalidating, None
            hit, confirmed = self._cache._revalidated(self._token, entry, status)
            if hit is not None:
                self._end(entry if confirmed else None)
                return hit
        if not self._storing:
            return None

        reason = self._unstorable_reason(status, headers)
        if reason is not None:
            self._give_up(reason)
            return None
        self._headers = _stored_headers(headers)
        self._accepted = True
        # A reservation covers the whole object up front when its length is known.
        if self._expected_length is not None and not self._reserve(
            entry_size(self._shape.entry_key, self._headers, self._expected_length)
        ):
            self._give_up("no room within max_bytes next to other fills in progress")
        return None

    def write(self, data: bytes) -> None:
        """Take a body chunk; stop storing once it exceeds ``max_object_bytes`` or ``max_bytes``."""
        if not self._storing or self._done or not data:
            return
        if not self._accepted:
            self._give_up("body arrived before the status and headers")
            return
        self._received += len(data)
        if self._received > self._cache._settings.max_object_bytes:
            self._give_up("body exceeds max_object_bytes")
            return
        if self._expected_length is not None and self._received > self._expected_length:
            self._give_up(f"body exceeds its Content-Length {self._expected_length}")
            return
        if self._expected_length is None:
            needed = entry_size(self._shape.entry_key, self._headers, self._received)
            if not self._reserve(needed):
                self._give_up("no room within max_bytes next to other fills in progress")
                return
        self._chunks.append(data)

    def finish(self) -> None:
        """Store the response if it is complete and no invalidation happened since the lookup."""
        if self._done:
            return
        if not self._storing:
            self._end()
            return
        if not self._accepted:
            self._give_up("fill finished without status and headers")
            return
        if self._expected_length is not None and self._received != self._expected_length:
            self._give_up(
                f"body has {self._received} bytes, Content-Length said {self._expected_length}"
            )
            return
        entry = CachedObject(
            entry_key=self._shape.entry_key,
            headers=self._headers,
            body=b"".join(self._chunks),
            etag=self._etag,
            last_modified=self._last_modified,
            validated_at=self._cache._clock.seconds(),
            size=entry_size(self._shape.entry_key, self._headers, self._received),
        )
        self._chunks = []
        stored = self._cache._store(entry, self._token, self._reserved)
        self._reserved = 0
        self._storing = False
        self._end(entry if stored else None)

    def abort(self) -> None:
        """Drop the response: the backend or the client failed before the end of the body."""
        if not self._done:
            self._give_up("fill aborted")

    # Internals.

    def _unstorable_reason(self, status: int, headers: Headers) -> str | None:
        """Return why a backend response must not be stored, or None if it may."""
        if status != 200:
            return f"backend status {status}"
        if headers.hasHeader(b"x-amz-server-side-encryption-customer-algorithm"):
            return "response is encrypted with a customer key (SSE-C)"
        for value in headers.getRawHeaders(b"cache-control", []):
            directives = {part.strip().split(b"=")[0].lower() for part in value.split(b",")}
            if directives & {b"no-store", b"private", b"no-cache"}:
                return f"response Cache-Control {value.decode('latin-1')!r}"
        for value in headers.getRawHeaders(b"vary", []):
            varying = {part.strip().lower() for part in value.split(b",")} - {b""}
            if not varying <= _CORS_VARY:
                return f"response varies by {value.decode('latin-1')!r}"
        etags = headers.getRawHeaders(b"etag")
        if etags is None or len(etags) != 1:
            return "response has no single ETag"
        self._etag = etags[0].decode("latin-1")
        lengths = headers.getRawHeaders(b"content-length")
        if lengths is not None:
            try:
                self._expected_length = int(lengths[0])
            except ValueError:
                return f"response Content-Length {lengths[0]!r} is not a number"
            if self._expected_length > self._cache._settings.max_object_bytes:
                return "Content-Length exceeds max_object_bytes"
        modified = headers.getRawHeaders(b"last-modified")
        if modified:
            try:
                self._last_modified = parse_http_date(modified[0].decode("latin-1"))
            except ValueError:
                self._last_modified = None
        return None

    def _reserve(self, total: int) -> bool:
        extra = total - self._reserved
        if extra <= 0:
            return True
        if not self._cache._reserve(extra):
            return False
        self._reserved += extra
        return True

    def _give_up(self, reason: str) -> None:
        self._cache._log.debug(
            "Not caching {bucket}/{key}: {reason}",
            bucket=self._shape.entry_key[0],
            key=self._shape.entry_key[1],
            reason=reason,
        )
        self._chunks = []
        self._storing = False
        self._cache._release(self._reserved)
        self._reserved = 0
        self._end()

    def _end(self, entry: CachedObject | None = None) -> None:
        """Settle the fill once: release its generation token and answer the waiters."""
        if self._done:
            return
        self._done = True
        if self._revalidating is not None:
            # The revalidation ended before a status arrived: the request went to the backend.
            self._revalidating = None
            self._cache._metrics.cache_misses_total.inc()
        if self._token is not None:
            self._cache._end_fill(self._shape.entry_key)
            self._token = None
        if self._flight is not None:
            self._cache._land(self._flight, entry)
            self._flight = None


def _stored_headers(headers: Headers) -> list[tuple[bytes, bytes]]:
    stored = []
    for name, values in headers.getAllRawHeaders():
        lower = name.lower()
        if lower in _TRANSFER_HEADERS:
            continue
        for value in values:
            stored.append((name, value))
    return stored


@dataclass(eq=False)
class _Flight:
    """A leader's fill in progress and the requests waiting for its result."""

    entry_key: EntryKey
    waiters: list[_Waiter] = field(default_factory=list)


@dataclass(eq=False)
class _Waiter:
    shape: _Shape
    deferred: Deferred[Outcome]
    timeout: _DelayedCall | None = None


# ---------------------------------------------------------------------------------------------
# The cache.


class ObjectCache(Service):
    """
    An LRU cache of GetObject responses bounded by bytes, with fleet-wide invalidation.

    Every method runs on the reactor thread.

    :param settings: the ``[cache]`` section. With ``enabled`` false :meth:`lookup` always
        returns :class:`NotCacheable` and no counter moves, but :meth:`invalidate` still
        publishes, because other proxies of the fleet may cache.
    :param metrics: receives ``cache_hits_total``, ``cache_misses_total``, ``cache_bytes``,
        ``cache_entries`` and ``cache_invalidations_unconfirmed_total``.
    :param clock: the time source for ``ttl`` and the coalescing timeout.
    :param bus: carries invalidations between proxies; :class:`LocalInvalidationBus` when the
        process has no Redis.
    :param coalesce_timeout: seconds a request waits for another request's fill of the same
        object before it goes to the backend itself.
    """

    _log = Logger()

    def __init__(
        self,
        settings: CacheSettings,
        metrics: CacheMetrics,
        clock: _Clock,
        bus: InvalidationBus | None = None,
        coalesce_timeout: float = 5.0,
    ) -> None:
        if settings.enabled:
            if settings.max_object_bytes < 1 or settings.max_bytes < 1:
                raise ValueError(
                    f"cache max_bytes {settings.max_bytes!r} and max_object_bytes"
                    f" {settings.max_object_bytes!r} are invalid; both must be >= 1"
                )
            if settings.ttl <= 0:
                raise ValueError(f"cache ttl {settings.ttl!r} is invalid; it must be > 0 seconds")
        self._settings = settings
        self._metrics = metrics
        self._clock = clock
        self._bus: InvalidationBus = bus if bus is not None else LocalInvalidationBus()
        self._coalesce_timeout = coalesce_timeout

        self._entries: OrderedDict[EntryKey, CachedObject] = OrderedDict()
        self._versions: dict[ObjectKey, set[EntryKey]] = {}
        self._stored_bytes = 0
        self._reserved_bytes = 0
        self._flights: dict[EntryKey, _Flight] = {}
        # Per object: the invalidation count and the number of fills in progress. A fill stores
        # only if the count is unchanged since its lookup; entries exist only while fills do.
        self._generations: dict[ObjectKey, list[int]] = {}
        # Bumped by clear(); a fill that began in an older epoch never stores.
        self._epoch = 0
        self._subscribed = False
        self._publish_gauges()

    # Service.

    def startService(self) -> None:
        """
        Subscribe to invalidations; caching starts once the subscription is confirmed.

        With the cache disabled, subscribe only to the confirmations of this proxy's writes.
        """
        super().startService()
        self._bus.subscribe(self if self._settings.enabled else None)

    def stopService(self) -> Deferred[None]:
        """Stop the subscription and empty the cache."""
        super().stopService()
        self._subscribed = False
        self.clear()
        return self._bus.close()

    # The gateway's interface.

    def lookup(self, auth: RequestAuth, request: CacheRequest) -> Deferred[Outcome]:
        """
        Decide how to answer an authenticated GetObject or HeadObject request.

        Counting: a GET that the cache could answer counts exactly once, as a hit when the
        response comes from cached bytes, otherwise as a miss. HEAD requests and requests that
        are not cacheable count as neither.

        :param auth: the verified signature of ``request``. The cache never answers a request
            that did not pass verification.
        :return: a Deferred that fires with a :class:`Hit`, :class:`Miss` or
            :class:`NotCacheable`. It fires at once, except when the request waits for another
            request's fill of the same object (at most ``coalesce_timeout`` seconds).
            Cancelling a waiting Deferred counts the request as a miss.
        :raises TypeError: ``auth`` is not a ``RequestAuth``.
        """
        if not isinstance(auth, RequestAuth):
            raise TypeError(
                f"cache lookup needs the RequestAuth of a verified request, got {type(auth)!r}"
            )
        if not self._settings.enabled:
            return succeed(NotCacheable("cache is disabled"))
        try:
            shape = analyze_request(request)
        except ValueError as err:
            return succeed(NotCacheable(str(err)))

        if not self._subscribed or not self._bus.serving_allowed():
            if shape.method == "HEAD":
                return succeed(NotCacheable("cache is off until the subscription is back"))
            return succeed(self._miss(shape, storing=False))

        entry = self._entries.get(shape.entry_key)
        if entry is not None and self._fresh(entry):
            return succeed(self._answer(entry, shape))
        if shape.method == "HEAD":
            return succeed(NotCacheable("HEAD of an object without a fresh entry"))

        flight = self._flights.get(shape.entry_key)
        if flight is not None:
            return self._wait(flight, shape)

        if entry is not None and shape.plain:
            flight = self._flights[shape.entry_key] = _Flight(shape.entry_key)
            fill = Fill(self, shape, flight, revalidating=entry, storing=True)
            return succeed(Miss(fill, {b"If-None-Match": entry.etag.encode("latin-1")}))

        if shape.plain:
            flight = self._flights[shape.entry_key] = _Flight(shape.entry_key)
            return succeed(self._miss(shape, storing=True, flight=flight))
        return succeed(self._miss(shape, storing=True))

    def render(self, hit: Hit) -> tuple[int, list[tuple[bytes, list[bytes]]], bytes]:
        """
        Build the status, headers and body of a hit.

        The body is the full representation for 200 and 206 even for HEAD, so that a writer
        that sets ``Content-Length`` from it sends the object's length; Twisted drops the body
        of a HEAD response. A 304 has an empty body and no ``Content-Length``.
        """
        entry = hit.entry
        headers: dict[bytes, list[bytes]] = {}
        if hit.status in (200, 206):
            for name, value in entry.headers:
                # A whole-object checksum does not describe a part of the body.
                if hit.status == 206 and name.lower().startswith(b"x-amz-checksum-"):
                    continue
                headers.setdefault(name, []).append(value)
            headers[b"Accept-Ranges"] = [b"bytes"]
        elif hit.status == 304:
            for name, value in entry.headers:
                if name.lower() in _NOT_MODIFIED_HEADERS:
                    headers.setdefault(name, []).append(value)

        body = b""
        if hit.status == 200:
            body = entry.body
        elif hit.status == 206:
            assert hit.byte_range is not None
            first, last = hit.byte_range
            body = entry.body[first : last + 1]
            headers[b"Content-Range"] = [b"bytes %d-%d/%d" % (first, last, len(entry.body))]
        elif hit.status in (412, 416):
            bucket, key, _version = entry.entry_key
            if hit.status == 412:
                code = "PreconditionFailed"
                message = "At least one of the preconditions you specified did not hold."
            else:
                code = "InvalidRange"
                message = "The requested range is not satisfiable"
                headers[b"Content-Range"] = [b"bytes */%d" % len(entry.body)]
            body = render_error(code, message, f"/{bucket}/{key}", "")
            headers[b"Content-Type"] = [b"application/xml"]
        return hit.status, list(headers.items()), body

    def serve(self, hit: Hit, request: WebRequest) -> int:
        """
        Write a hit as the complete response to ``request`` and finish it.

        :return: the HTTP status sent, for the request metrics.
        """
        status, headers, body = self.render(hit)
        request.setResponseCode(status)
        for name, values in headers:
            request.responseHeaders.setRawHeaders(name, values)
        if status != 304:
            request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
        if body and hit.method == "GET":
            request.write(body)
        request.finish()
        return status

    def invalidate(
        self, bucket: str, keys: Iterable[str] | None, confirm: bool = True
    ) -> Deferred[None]:
        """
        Evict every version of ``keys`` in ``bucket`` here and publish it to the fleet.

        ``keys`` None stands for keys that are not known (a DeleteObjects body that could not
        be read) and empties the whole cache here and on every proxy.

        Call it when a write (PUT, COPY onto the key, DELETE, DeleteObjects,
        CompleteMultipartUpload, and any other request that changes an object) starts and again
        when it completes. Fills that began before either call are not stored.

        :param confirm: wait until every caching proxy has evicted the keys. Pass False for
            the call at the start of a write, whose result is not awaited.
        :return: a Deferred that fires with None once every caching proxy confirmed the
            eviction, or when that failed or took longer than the bus's timeout (1 s); it never
            fails. Waiting for it before answering the write means that a client who saw the
            write's response cannot read older bytes through another proxy. A confirmation that
            did not come in counts in ``cache_invalidations_unconfirmed_total``.
        """
        key_list = None if keys is None else list(keys)
        self._invalidate_local(bucket, key_list)
        published = self._bus.publish(bucket, key_list, confirm=confirm)
        return published.addCallback(self._count_unconfirmed, confirm)

    def _count_unconfirmed(self, confirmed: bool, confirm: bool) -> None:
        if confirm and not confirmed:
            self._metrics.cache_invalidations_unconfirmed_total.inc()

    def clear(self) -> None:
        """Empty the cache; fills in progress will not store and their waiters fall back."""
        self._epoch += 1
        self._entries.clear()
        self._versions.clear()
        self._stored_bytes = 0
        # Leaders still settle their flights, and the epoch check keeps them from storing.
        self._flights.clear()
        self._publish_gauges()

    # InvalidationListener.

    def subscription_ready(self) -> None:
        """Empty the cache and start caching: no invalidation is missed from now on."""
        self.clear()
        self._subscribed = True

    def subscription_lost(self, reason: str) -> None:
        """Empty the cache and stop caching until :meth:`subscription_ready`."""
        self._subscribed = False
        self.clear()

    def invalidation_received(self, bucket: str, keys: Sequence[str] | None) -> None:
        """Evict keys that another proxy changed; None empties the cache."""
        self._invalidate_local(bucket, keys)

    # Introspection for tests and debugging.

    @property
    def stored_bytes(self) -> int:
        """Bytes charged by stored entries."""
        return self._stored_bytes

    @property
    def reserved_bytes(self) -> int:
        """Bytes reserved by fills in progress."""
        return self._reserved_bytes

    @property
    def caching(self) -> bool:
        """Whether the cache answers and stores right now."""
        return self._settings.enabled and self._subscribed and self._bus.serving_allowed()

    def entries(self) -> Iterator[CachedObject]:
        """Iterate over the entries from least to most recently used."""
        return iter(list(self._entries.values()))

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, entry_key: object) -> bool:
        return entry_key in self._entries

    # Lookup helpers.

    def _fresh(self, entry: CachedObject) -> bool:
        return self._clock.seconds() - entry.validated_at < self._settings.ttl

    def _answer(self, entry: CachedObject, shape: _Shape) -> Hit | NotCacheable:
        """Build the response to ``shape`` from ``entry``, counting a hit for GET."""
        try:
            hit = _respond(entry, shape)
        except ValueError as err:
            return NotCacheable(str(err))
        self._entries.move_to_end(entry.entry_key)
        if shape.method == "GET":
            self._metrics.cache_hits_total.inc()
        return hit

    def _miss(self, shape: _Shape, storing: bool, flight: _Flight | None = None) -> Miss:
        self._metrics.cache_misses_total.inc()
        return Miss(Fill(self, shape, flight, revalidating=None, storing=storing))

    def _wait(self, flight: _Flight, shape: _Shape) -> Deferred[Outcome]:
        def cancel(_deferred: Deferred[Outcome]) -> None:
            if waiter in flight.waiters:
                flight.waiters.remove(waiter)
                if waiter.timeout is not None and waiter.timeout.active():
                    waiter.timeout.cancel()
                self._metrics.cache_misses_total.inc()

        def expire() -> None:
            waiter.timeout = None
            if waiter in flight.waiters:
                flight.waiters.remove(waiter)
                waiter.deferred.callback(self._miss(shape, storing=True))

        waiter = _Waiter(shape, Deferred(cancel))
        waiter.timeout = self._clock.callLater(self._coalesce_timeout, expire)
        flight.waiters.append(waiter)
        return waiter.deferred

    def _land(self, flight: _Flight, entry: CachedObject | None) -> None:
        """Answer a flight's waiters from the stored entry, or send them to the backend."""
        if self._flights.get(flight.entry_key) is flight:
            del self._flights[flight.entry_key]
        waiters, flight.waiters = flight.waiters, []
        for waiter in waiters:
            if waiter.timeout is not None and waiter.timeout.active():
                waiter.timeout.cancel()
            outcome: Outcome
            if entry is not None:
                outcome = self._answer(entry, waiter.shape)
            else:
                outcome = self._miss(waiter.shape, storing=True)
            waiter.deferred.callback(outcome)

    def _revalidated(
        self, token: tuple[int, int] | None, entry: CachedObject, status: int
    ) -> tuple[Hit | None, bool]:
        """
        Settle a revalidation: 304 refreshes the entry and counts a hit, anything else a miss.

        :return: the hit to serve (None unless 304) and whether no invalidation happened since
            the lookup, so that waiters may be served from the entry too.
        """
        if status != 304:
            self._metrics.cache_misses_total.inc()
            self._evict(entry.entry_key)
            return None, False
        self._metrics.cache_hits_total.inc()
        confirmed = token is not None and self._token_valid(entry.entry_key, token)
        if confirmed and self._entries.get(entry.entry_key) is entry:
            entry.validated_at = self._clock.seconds()
            self._entries.move_to_end(entry.entry_key)
        # The backend confirmed these bytes while this request was in progress, so this client
        # gets them even if an invalidation arrived meanwhile.
        return Hit(entry, "GET", 200), confirmed

    # Storage.

    def _begin_fill(self, entry_key: EntryKey) -> tuple[int, int]:
        object_key = (entry_key[0], entry_key[1])
        state = self._generations.setdefault(object_key, [0, 0])
        state[1] += 1
        return (self._epoch, state[0])

    def _end_fill(self, entry_key: EntryKey) -> None:
        object_key = (entry_key[0], entry_key[1])
        state = self._generations[object_key]
        state[1] -= 1
        if state[1] == 0:
            del self._generations[object_key]

    def _token_valid(self, entry_key: EntryKey, token: tuple[int, int]) -> bool:
        epoch, generation = token
        state = self._generations.get((entry_key[0], entry_key[1]))
        return epoch == self._epoch and state is not None and state[0] == generation

    def _store(self, entry: CachedObject, token: tuple[int, int] | None, reserved: int) -> bool:
        """
        Insert ``entry`` unless an invalidation or clear happened since its fill began.

        Nothing is stored while the bus's lease has lapsed, because an invalidation of this
        object may be on its way. The fill's waiters then go to the backend themselves.
        """
        self._release(reserved)
        if token is None or not self.caching or not self._token_valid(entry.entry_key, token):
            return False
        self._evict(entry.entry_key)
        if not self._make_room(entry.size):
            return False
        self._entries[entry.entry_key] = entry
        self._versions.setdefault((entry.entry_key[0], entry.entry_key[1]), set()).add(
            entry.entry_key
        )
        self._stored_bytes += entry.size
        self._publish_gauges()
        return True

    def _reserve(self, size: int) -> bool:
        if not self._make_room(size):
            return False
        self._reserved_bytes += size
        return True

    def _release(self, size: int) -> None:
        self._reserved_bytes -= size

    def _make_room(self, size: int) -> bool:
        """Evict least recently used entries until ``size`` more bytes fit within max_bytes."""
        limit = self._settings.max_bytes
        if self._reserved_bytes + size > limit:
            return False
        evicted = False
        while self._entries and self._stored_bytes + self._reserved_bytes + size > limit:
            oldest = next(iter(self._entries))
            self._evict(oldest, publish=False)
            evicted = True
        if evicted:
            self._publish_gauges()
        return self._stored_bytes + self._reserved_bytes + size <= limit

    def _evict(self, entry_key: EntryKey, publish: bool = True) -> None:
        entry = self._entries.pop(entry_key, None)
        if entry is None:
            return
        self._stored_bytes -= entry.size
        object_key = (entry_key[0], entry_key[1])
        versions = self._versions.get(object_key)
        if versions is not None:
            versions.discard(entry_key)
            if not versions:
                del self._versions[object_key]
        if publish:
            self._publish_gauges()

    def _invalidate_local(self, bucket: str, keys: Iterable[str] | None) -> None:
        if keys is None:
            self.clear()
            return
        for key in keys:
            object_key = (bucket, key)
            for entry_key in list(self._versions.get(object_key, ())):
                self._evict(entry_key, publish=False)
            state = self._generations.get(object_key)
            if state is not None:
                state[0] += 1
                # New lookups start a new fill instead of joining one that cannot store.
                for entry_key in [k for k in self._flights if k[0] == bucket and k[1] == key]:
                    del self._flights[entry_key]
        self._publish_gauges()

    def _publish_gauges(self) -> None:
        self._metrics.cache_bytes.set(self._stored_bytes)
        self._metrics.cache_entries.set(len(self._entries))


def _respond(entry: CachedObject, shape: _Shape) -> Hit:
    """
    Compute the response to ``shape`` from ``entry``: conditionals first, then Range.

    :raises ValueError: the cache cannot reproduce the backend's answer exactly (a date
        condition without Last-Modified, a Range on an empty object).
    """
    status = evaluate_conditions(shape.conditions, entry.etag, entry.last_modified)
    if status != 200:
        return Hit(entry, shape.method, status)
    if shape.byte_range is None:
        return Hit(entry, shape.method, 200)
    size = len(entry.body)
    if size == 0:
        raise ValueError("Range on an empty object")
    resolved = resolve_range(shape.byte_range, size)
    if resolved is None:
        return Hit(entry, shape.method, 416)
    return Hit(entry, shape.method, 206, resolved)
