"""Unit tests of the object cache: storage, counting, HTTP semantics, coalescing, coherence."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.test.requesthelper import DummyRequest

from proxy.cache import (
    CacheRequest,
    Hit,
    Miss,
    NotCacheable,
    ObjectCache,
    Outcome,
    _Conditions,
    entry_size,
    evaluate_conditions,
    parse_entity_tags,
    parse_http_date,
    parse_range,
    resolve_range,
)
from proxy.sigv4 import RequestAuth

LAST_MODIFIED = "Wed, 02 Dec 2026 10:00:00 GMT"


@dataclass(frozen=True)
class Settings:
    enabled: bool = True
    max_bytes: int = 64 * 1024
    max_object_bytes: int = 16 * 1024
    ttl: float = 60.0


class FakeCounter:
    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        self.value += amount


class FakeGauge:
    def __init__(self) -> None:
        self.value = 0.0
        self.history: list[float] = []

    def set(self, value: float) -> None:
        self.value = value
        self.history.append(value)


class FakeMetrics:
    def __init__(self) -> None:
        self.cache_hits_total = FakeCounter()
        self.cache_misses_total = FakeCounter()
        self.cache_bytes = FakeGauge()
        self.cache_entries = FakeGauge()
        self.cache_invalidations_unconfirmed_total = FakeCounter()


def make_auth() -> RequestAuth:
    """Build a RequestAuth with placeholder values; the cache only checks its type."""
    placeholders: dict[str, Any] = {}
    for spec in dataclasses.fields(RequestAuth):
        placeholders[spec.name] = {
            "kind": "header",
            "signing_key": b"k",
            "decoded_content_length": None,
            "trailer_names": (),
            "checksum_headers": {},
            "forward_target": b"/bucket/key",
            "strip_headers": frozenset(),
            "backend_content_encoding": None,
        }.get(spec.name, "placeholder")
    return RequestAuth(**placeholders)


AUTH = make_auth()


def request(
    key: str = "key",
    method: str = "GET",
    query: bytes = b"",
    headers: dict[str, str] | None = None,
    bucket: str = "bucket",
) -> CacheRequest:
    raw = Headers()
    for name, value in (headers or {}).items():
        raw.addRawHeader(name.encode(), value.encode())
    return CacheRequest(method, bucket, key, query, raw)


def response_headers(
    body: bytes, etag: str = '"abc"', extra: dict[str, str] | None = None, length: bool = True
) -> Headers:
    headers = Headers()
    headers.addRawHeader(b"ETag", etag.encode())
    headers.addRawHeader(b"Content-Type", b"text/plain")
    headers.addRawHeader(b"Last-Modified", LAST_MODIFIED.encode())
    if length:
        headers.addRawHeader(b"Content-Length", b"%d" % len(body))
    for name, value in (extra or {}).items():
        headers.addRawHeader(name.encode(), value.encode())
    return headers


def result(deferred: Deferred[Outcome]) -> Outcome:
    results: list[Any] = []
    deferred.addBoth(results.append)
    assert results, "the lookup Deferred has not fired"
    value = results[0]
    if isinstance(value, Failure):
        value.raiseException()
    return value


def make_cache(
    settings: Settings | None = None, clock: Clock | None = None
) -> tuple[ObjectCache, FakeMetrics, Clock]:
    metrics = FakeMetrics()
    clock = clock or Clock()
    cache = ObjectCache(settings or Settings(), metrics, clock)
    cache.startService()
    return cache, metrics, clock


def fill(outcome: Outcome, body: bytes, status: int = 200, headers: Headers | None = None) -> None:
    """Stream a backend response through a miss's fill."""
    assert isinstance(outcome, Miss)
    outcome.fill.start(status, headers if headers is not None else response_headers(body))
    outcome.fill.write(body)
    outcome.fill.finish()


def store(cache: ObjectCache, key: str, body: bytes, **kwargs: Any) -> None:
    fill(result(cache.lookup(AUTH, request(key))), body, **kwargs)


def served(cache: ObjectCache, hit: Outcome, method: bytes = b"GET") -> DummyRequest:
    assert isinstance(hit, Hit)
    web_request = DummyRequest([b""])
    web_request.method = method
    cache.serve(hit, web_request)
    return web_request


def header(web_request: DummyRequest, name: bytes) -> bytes | None:
    values = web_request.responseHeaders.getRawHeaders(name)
    return values[0] if values else None


# Storage and counting.


def test_disabled_counts_nothing() -> None:
    """A disabled cache answers NotCacheable and moves no counter."""
    cache, metrics, _ = make_cache(Settings(enabled=False))
    outcome = result(cache.lookup(AUTH, request()))
    assert isinstance(outcome, NotCacheable)
    assert metrics.cache_hits_total.value == 0
    assert metrics.cache_misses_total.value == 0


def test_miss_then_hit() -> None:
    """The first GET is a miss that fills the cache; the next one is a hit."""
    cache, metrics, _ = make_cache()
    first = result(cache.lookup(AUTH, request()))
    assert isinstance(first, Miss)
    fill(first, b"hello")
    second = result(cache.lookup(AUTH, request()))
    assert isinstance(second, Hit)
    assert metrics.cache_misses_total.value == 1
    assert metrics.cache_hits_total.value == 1


def test_hit_replays_object_headers() -> None:
    """A hit sends the object's headers and body but not the backend's transfer headers."""
    cache, _, _ = make_cache()
    extra = {
        "x-amz-meta-colour": "blue",
        "x-amz-version-id": "v1",
        "Cache-Control": "max-age=300",
        "Content-Disposition": "attachment",
        "x-amz-request-id": "BACKEND1",
        "Date": "Wed, 02 Dec 2026 11:00:00 GMT",
    }
    store(cache, "key", b"hello", headers=response_headers(b"hello", extra=extra))
    web_request = served(cache, result(cache.lookup(AUTH, request())))
    assert web_request.responseCode == 200
    assert b"".join(web_request.written) == b"hello"
    assert header(web_request, b"etag") == b'"abc"'
    assert header(web_request, b"content-length") == b"5"
    assert header(web_request, b"x-amz-meta-colour") == b"blue"
    assert header(web_request, b"x-amz-version-id") == b"v1"
    assert header(web_request, b"cache-control") == b"max-age=300"
    assert header(web_request, b"content-disposition") == b"attachment"
    assert header(web_request, b"last-modified") == LAST_MODIFIED.encode()
    assert header(web_request, b"x-amz-request-id") is None
    assert header(web_request, b"date") is None
    assert web_request.finished == 1


def test_head_served_from_entry() -> None:
    """HEAD of a cached object gets its headers and length, no body, and counts nothing."""
    cache, metrics, _ = make_cache()
    store(cache, "key", b"hello")
    outcome = result(cache.lookup(AUTH, request(method="HEAD")))
    web_request = served(cache, outcome, method=b"HEAD")
    assert web_request.responseCode == 200
    assert web_request.written == []
    assert header(web_request, b"content-length") == b"5"
    assert metrics.cache_hits_total.value == 0
    assert metrics.cache_misses_total.value == 1


def test_head_of_absent_object_passes() -> None:
    """HEAD of an object that is not cached is passed through without counting."""
    cache, metrics, _ = make_cache()
    outcome = result(cache.lookup(AUTH, request(method="HEAD")))
    assert isinstance(outcome, NotCacheable)
    assert metrics.cache_misses_total.value == 0


def test_lookup_requires_request_auth() -> None:
    """lookup raises TypeError unless it gets the RequestAuth of a verified request."""
    cache, _, _ = make_cache()
    with pytest.raises(TypeError):
        cache.lookup(None, request())  # type: ignore[arg-type]


def test_versions_cached_apart() -> None:
    """GETs with different versionId values are separate entries."""
    cache, _, _ = make_cache()
    fill(result(cache.lookup(AUTH, request(query=b"versionId=v1"))), b"one")
    fill(result(cache.lookup(AUTH, request(query=b"versionId=v2"))), b"two")
    one = served(cache, result(cache.lookup(AUTH, request(query=b"versionId=v1"))))
    two = served(cache, result(cache.lookup(AUTH, request(query=b"versionId=v2"))))
    assert b"".join(one.written) == b"one"
    assert b"".join(two.written) == b"two"


def test_neutral_query_still_cached() -> None:
    """The x-id query parameter that SDKs append does not stop caching."""
    cache, _, _ = make_cache()
    store(cache, "key", b"hello")
    outcome = result(cache.lookup(AUTH, request(query=b"x-id=GetObject")))
    assert isinstance(outcome, Hit)


# Not cacheable requests and responses.


@pytest.mark.parametrize(
    ("method", "query", "headers"),
    [
        ("PUT", b"", {}),
        ("GET", b"response-content-type=text%2Fhtml", {}),
        ("GET", b"partNumber=1", {}),
        ("GET", b"versionId=", {}),
        ("GET", b"", {"x-amz-server-side-encryption-customer-algorithm": "AES256"}),
        ("GET", b"", {"x-amz-request-payer": "requester"}),
        ("GET", b"", {"x-amz-expected-bucket-owner": "111122223333"}),
        ("GET", b"", {"If-Range": '"abc"'}),
        ("GET", b"", {"Origin": "https://example.org"}),
        ("GET", b"", {"Cache-Control": "no-cache"}),
        ("GET", b"", {"Range": "bytes=0-1,4-5"}),
        ("GET", b"", {"Range": "bytes=5-3"}),
        ("GET", b"", {"Range": "items=0-1"}),
        ("GET", b"", {"If-Modified-Since": "Wednesday, 02-Dec-26 10:00:00 GMT"}),
        ("GET", b"", {"If-None-Match": "abc"}),
    ],
)
def test_not_cacheable_counts_neither(method: str, query: bytes, headers: dict[str, str]) -> None:
    """Requests the cache cannot answer exactly pass through and count as neither."""
    cache, metrics, _ = make_cache()
    store(cache, "key", b"hello")
    before = metrics.cache_misses_total.value
    outcome = result(cache.lookup(AUTH, request(method=method, query=query, headers=headers)))
    assert isinstance(outcome, NotCacheable)
    assert metrics.cache_hits_total.value == 0
    assert metrics.cache_misses_total.value == before


@pytest.mark.parametrize(
    ("status", "extra"),
    [
        (404, {}),
        (206, {}),
        (200, {"Cache-Control": "no-store"}),
        (200, {"Cache-Control": "private, max-age=60"}),
        (200, {"Cache-Control": "no-cache"}),
        (200, {"x-amz-server-side-encryption-customer-algorithm": "AES256"}),
        (200, {"Vary": "Accept-Encoding"}),
        (200, {"Vary": "Origin, User-Agent"}),
    ],
)
def test_response_not_stored(status: int, extra: dict[str, str]) -> None:
    """Responses other than a plain, shareable 200 are not stored."""
    cache, _, _ = make_cache()
    store(cache, "key", b"hello", status=status, headers=response_headers(b"hello", extra=extra))
    assert len(cache) == 0


def test_cors_vary_stored() -> None:
    """A response that varies only by the CORS request headers is stored."""
    cache, _, _ = make_cache()
    vary = {"Vary": "Origin, Access-Control-Request-Headers, Access-Control-Request-Method"}
    store(cache, "key", b"hello", headers=response_headers(b"hello", extra=vary))
    assert len(cache) == 1


def test_object_over_max_object_bytes() -> None:
    """A response longer than max_object_bytes is not stored, with or without Content-Length."""
    cache, _, _ = make_cache(Settings(max_object_bytes=10))
    store(cache, "declared", b"x" * 11)
    outcome = result(cache.lookup(AUTH, request("streamed")))
    assert isinstance(outcome, Miss)
    outcome.fill.start(200, response_headers(b"", length=False))
    for _ in range(3):
        outcome.fill.write(b"xxxx")
    outcome.fill.finish()
    assert len(cache) == 0
    assert cache.reserved_bytes == 0


def test_short_body_not_stored() -> None:
    """A body shorter than its Content-Length (a cut transfer) is not stored."""
    cache, _, _ = make_cache()
    outcome = result(cache.lookup(AUTH, request()))
    assert isinstance(outcome, Miss)
    outcome.fill.start(200, response_headers(b"hello"))
    outcome.fill.write(b"hel")
    outcome.fill.finish()
    assert len(cache) == 0


def test_fill_without_start_not_stored() -> None:
    """A fill that gets body bytes without a status and headers stores nothing."""
    cache, _, _ = make_cache()
    outcome = result(cache.lookup(AUTH, request()))
    assert isinstance(outcome, Miss)
    outcome.fill.write(b"hello")
    outcome.fill.finish()
    assert len(cache) == 0
    assert cache.reserved_bytes == 0


def test_abort_not_stored() -> None:
    """An aborted fill stores nothing and releases its reservation."""
    cache, _, _ = make_cache()
    outcome = result(cache.lookup(AUTH, request()))
    assert isinstance(outcome, Miss)
    outcome.fill.start(200, response_headers(b"hello"))
    outcome.fill.write(b"hel")
    outcome.fill.abort()
    assert len(cache) == 0
    assert cache.reserved_bytes == 0


# Memory bound and LRU.


def test_lru_evicts_by_bytes() -> None:
    """When a new entry does not fit, the least recently used entries go first."""
    body = b"x" * 1000
    one = entry_size(("bucket", "a", None), _stored(body), len(body))
    cache, _, _ = make_cache(Settings(max_bytes=2 * one + one // 2))
    store(cache, "a", body)
    store(cache, "b", body)
    assert isinstance(result(cache.lookup(AUTH, request("a"))), Hit)
    store(cache, "c", body)
    assert ("bucket", "a", None) in cache
    assert ("bucket", "b", None) not in cache
    assert ("bucket", "c", None) in cache


def _stored(body: bytes) -> list[tuple[bytes, bytes]]:
    headers = response_headers(body)
    return [
        (name, value)
        for name, values in headers.getAllRawHeaders()
        for value in values
        if name.lower() != b"content-length"
    ]


def test_storm_stays_within_max_bytes() -> None:
    """A storm of distinct keys never takes the cache over max_bytes, gauges included."""
    settings = Settings(max_bytes=20_000, max_object_bytes=4_000)
    cache, metrics, _ = make_cache(settings)
    for index in range(500):
        body = bytes(index % 256 for _ in range(index * 7 % 4_000))
        store(cache, f"key-{index}", body)
        assert cache.stored_bytes + cache.reserved_bytes <= settings.max_bytes
    assert max(metrics.cache_bytes.history) <= settings.max_bytes
    assert metrics.cache_bytes.value == cache.stored_bytes
    assert metrics.cache_entries.value == len(cache)
    assert len(cache) > 1


def test_storm_of_concurrent_fills() -> None:
    """Fills in progress count against max_bytes, so many at once cannot exceed it."""
    settings = Settings(max_bytes=10_000, max_object_bytes=4_000)
    cache, _, _ = make_cache(settings)
    misses = [result(cache.lookup(AUTH, request(f"key-{index}"))) for index in range(20)]
    for outcome in misses:
        assert isinstance(outcome, Miss)
        outcome.fill.start(200, response_headers(b"x" * 3_000))
        outcome.fill.write(b"x" * 3_000)
        assert cache.stored_bytes + cache.reserved_bytes <= settings.max_bytes
    for outcome in misses:
        assert isinstance(outcome, Miss)
        outcome.fill.finish()
        assert cache.stored_bytes + cache.reserved_bytes <= settings.max_bytes
    assert cache.reserved_bytes == 0
    assert len(cache) >= 1


# TTL and revalidation.


def test_stale_entry_revalidates_304() -> None:
    """After ttl a GET revalidates with If-None-Match; a 304 serves and refreshes the entry."""
    cache, metrics, clock = make_cache(Settings(ttl=10))
    store(cache, "key", b"hello")
    clock.advance(10)
    outcome = result(cache.lookup(AUTH, request()))
    assert isinstance(outcome, Miss)
    assert outcome.backend_headers == {b"If-None-Match": b'"abc"'}
    hit = outcome.fill.start(304, response_headers(b""))
    assert isinstance(hit, Hit)
    assert b"".join(served(cache, hit).written) == b"hello"
    assert isinstance(result(cache.lookup(AUTH, request())), Hit)
    assert metrics.cache_hits_total.value == 2
    assert metrics.cache_misses_total.value == 1


def test_stale_entry_replaced_by_200() -> None:
    """A revalidation answered 200 replaces the entry with the new object and counts a miss."""
    cache, metrics, clock = make_cache(Settings(ttl=10))
    store(cache, "key", b"hello")
    clock.advance(11)
    outcome = result(cache.lookup(AUTH, request()))
    assert isinstance(outcome, Miss)
    assert outcome.fill.start(200, response_headers(b"world", etag='"new"')) is None
    outcome.fill.write(b"world")
    outcome.fill.finish()
    hit = result(cache.lookup(AUTH, request()))
    assert b"".join(served(cache, hit).written) == b"world"
    assert metrics.cache_misses_total.value == 2
    assert metrics.cache_hits_total.value == 1


def test_failed_revalidation_counts_miss() -> None:
    """A revalidation that ends before any status counts as one miss."""
    cache, metrics, clock = make_cache(Settings(ttl=10))
    store(cache, "key", b"hello")
    clock.advance(11)
    outcome = result(cache.lookup(AUTH, request()))
    assert isinstance(outcome, Miss)
    outcome.fill.abort()
    assert metrics.cache_misses_total.value == 2
    assert metrics.cache_hits_total.value == 0


def test_fresh_entry_served_until_ttl() -> None:
    """An entry is served without revalidation until ttl seconds have passed."""
    cache, _, clock = make_cache(Settings(ttl=10))
    store(cache, "key", b"hello")
    clock.advance(9.9)
    assert isinstance(result(cache.lookup(AUTH, request())), Hit)


# Range requests.


@pytest.mark.parametrize(
    ("value", "size", "expected"),
    [
        ("bytes=0-", 10, (0, 9)),
        ("bytes=0-0", 10, (0, 0)),
        ("bytes=2-4", 10, (2, 4)),
        ("bytes=9-", 10, (9, 9)),
        ("bytes=5-100", 10, (5, 9)),
        ("bytes=-5", 10, (5, 9)),
        ("bytes=-10", 10, (0, 9)),
        ("bytes=-50", 10, (0, 9)),
        ("bytes=10-", 10, None),
        ("bytes=10-20", 10, None),
        ("bytes=-0", 10, None),
    ],
)
def test_range_resolution(value: str, size: int, expected: tuple[int, int] | None) -> None:
    """Single byte ranges resolve to inclusive offsets, or None when unsatisfiable."""
    assert resolve_range(parse_range(value), size) == expected


@pytest.mark.parametrize("value", ["bytes=", "bytes=-", "bytes=3-1", "bytes=0-1,3-4", "bytes=a-"])
def test_range_rejected(value: str) -> None:
    """Malformed and multi-range headers are rejected, so they go to the backend."""
    with pytest.raises(ValueError):
        parse_range(value)


def test_range_served_206() -> None:
    """A Range GET on a cached object is a 206 with Content-Range and the slice."""
    cache, metrics, _ = make_cache()
    store(cache, "key", b"0123456789")
    hit = result(cache.lookup(AUTH, request(headers={"Range": "bytes=-3"})))
    web_request = served(cache, hit)
    assert web_request.responseCode == 206
    assert b"".join(web_request.written) == b"789"
    assert header(web_request, b"content-range") == b"bytes 7-9/10"
    assert header(web_request, b"content-length") == b"3"
    assert metrics.cache_hits_total.value == 1


def test_range_drops_checksum() -> None:
    """A 206 from the cache leaves out the whole-object checksum; a 200 keeps it."""
    cache, _, _ = make_cache()
    extra = {"x-amz-checksum-crc32": "AAAAAA=="}
    store(cache, "key", b"0123456789", headers=response_headers(b"0123456789", extra=extra))
    checksum_mode = {"x-amz-checksum-mode": "ENABLED"}
    ranged = result(cache.lookup(AUTH, request(headers={**checksum_mode, "Range": "bytes=0-1"})))
    whole = result(cache.lookup(AUTH, request(headers=checksum_mode)))
    assert header(served(cache, ranged), b"x-amz-checksum-crc32") is None
    assert header(served(cache, whole), b"x-amz-checksum-crc32") == b"AAAAAA=="


def test_range_served_416() -> None:
    """An unsatisfiable range is a 416 with Content-Range bytes */size."""
    cache, _, _ = make_cache()
    store(cache, "key", b"0123456789")
    hit = result(cache.lookup(AUTH, request(headers={"Range": "bytes=10-"})))
    web_request = served(cache, hit)
    assert web_request.responseCode == 416
    assert header(web_request, b"content-range") == b"bytes */10"
    assert b"InvalidRange" in b"".join(web_request.written)


def test_range_on_empty_object_passes() -> None:
    """A Range GET on a cached empty object is passed to the backend, counting neither."""
    cache, metrics, _ = make_cache()
    store(cache, "key", b"")
    outcome = result(cache.lookup(AUTH, request(headers={"Range": "bytes=0-"})))
    assert isinstance(outcome, NotCacheable)
    assert metrics.cache_hits_total.value == 0


def test_range_miss_not_stored() -> None:
    """A Range GET of an uncached object counts a miss and its 206 is not stored."""
    cache, metrics, _ = make_cache()
    outcome = result(cache.lookup(AUTH, request(headers={"Range": "bytes=0-1"})))
    fill(outcome, b"01", status=206)
    assert metrics.cache_misses_total.value == 1
    assert len(cache) == 0


# Conditional requests.


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"If-None-Match": '"abc"'}, 304),
        ({"If-None-Match": 'W/"abc"'}, 304),
        ({"If-None-Match": '"x", "abc"'}, 304),
        ({"If-None-Match": "*"}, 304),
        ({"If-None-Match": '"other"'}, 200),
        ({"If-Match": '"abc"'}, 200),
        ({"If-Match": '"other"'}, 412),
        ({"If-Match": "*"}, 200),
        ({"If-Modified-Since": LAST_MODIFIED}, 304),
        ({"If-Modified-Since": "Wed, 02 Dec 2026 09:59:59 GMT"}, 200),
        ({"If-Unmodified-Since": LAST_MODIFIED}, 200),
        ({"If-Unmodified-Since": "Wed, 02 Dec 2026 09:59:59 GMT"}, 412),
        ({"If-Match": '"abc"', "If-Unmodified-Since": "Tue, 01 Dec 2026 00:00:00 GMT"}, 200),
        ({"If-None-Match": '"other"', "If-Modified-Since": LAST_MODIFIED}, 200),
        ({"If-Match": '"other"', "If-None-Match": '"abc"'}, 412),
        ({"If-None-Match": '"abc"', "Range": "bytes=0-1"}, 304),
        ({"If-Match": '"abc"', "Range": "bytes=0-1"}, 206),
    ],
)
def test_conditional_served(headers: dict[str, str], status: int) -> None:
    """Conditional GETs are evaluated against the cached ETag and Last-Modified as S3 does."""
    cache, metrics, _ = make_cache()
    store(cache, "key", b"hello")
    hit = result(cache.lookup(AUTH, request(headers=headers)))
    web_request = served(cache, hit)
    assert web_request.responseCode == status
    assert metrics.cache_hits_total.value == 1


def test_not_modified_has_no_body() -> None:
    """A 304 from the cache carries the ETag and no body."""
    cache, _, _ = make_cache()
    store(cache, "key", b"hello")
    web_request = served(cache, result(cache.lookup(AUTH, request(headers={"If-None-Match": "*"}))))
    assert web_request.written == []
    assert header(web_request, b"etag") == b'"abc"'
    assert header(web_request, b"content-type") is None


def test_date_condition_without_last_modified() -> None:
    """A date condition on an entry without Last-Modified goes to the backend, counting neither."""
    cache, metrics, _ = make_cache()
    headers = Headers({b"ETag": [b'"abc"'], b"Content-Length": [b"5"]})
    store(cache, "key", b"hello", headers=headers)
    outcome = result(cache.lookup(AUTH, request(headers={"If-Modified-Since": LAST_MODIFIED})))
    assert isinstance(outcome, NotCacheable)
    assert metrics.cache_hits_total.value == 0


def test_http_date_parsing() -> None:
    """IMF-fixdate parses to epoch seconds; other date forms are rejected."""
    assert parse_http_date("Thu, 01 Jan 1970 00:01:00 GMT") == 60
    with pytest.raises(ValueError):
        parse_http_date("Thursday, 01-Jan-70 00:01:00 GMT")


def test_entity_tag_parsing() -> None:
    """Entity tag lists keep weak prefixes and reject unquoted tags."""
    assert parse_entity_tags('"a", W/"b"') == ('"a"', 'W/"b"')
    with pytest.raises(ValueError):
        parse_entity_tags("a")


def test_weak_etag_fails_if_match() -> None:
    """If-Match uses strong comparison, so a weak entity tag never matches it."""
    conditions = _Conditions(if_match=parse_entity_tags('W/"abc"'))
    assert evaluate_conditions(conditions, '"abc"', None) == 412


# Coalescing.


def test_coalesced_misses_one_fetch() -> None:
    """Fifty concurrent GETs of one object make one fill; the other 49 wait and count as hits."""
    cache, metrics, _ = make_cache()
    deferreds = [cache.lookup(AUTH, request()) for _ in range(50)]
    leader = result(deferreds[0])
    assert isinstance(leader, Miss)
    waiting = [deferred for deferred in deferreds[1:] if not deferred.called]
    assert len(waiting) == 49
    fill(leader, b"hello")
    outcomes = [result(deferred) for deferred in deferreds[1:]]
    assert all(isinstance(outcome, Hit) for outcome in outcomes)
    assert metrics.cache_misses_total.value == 1
    assert metrics.cache_hits_total.value == 49


def test_waiters_fall_back_on_failure() -> None:
    """When the leader's fill fails, every waiter gets its own miss and counts as one."""
    cache, metrics, _ = make_cache()
    deferreds = [cache.lookup(AUTH, request()) for _ in range(5)]
    leader = result(deferreds[0])
    assert isinstance(leader, Miss)
    leader.fill.start(500, Headers())
    leader.fill.abort()
    outcomes = [result(deferred) for deferred in deferreds[1:]]
    assert all(isinstance(outcome, Miss) for outcome in outcomes)
    assert metrics.cache_misses_total.value == 5
    assert metrics.cache_hits_total.value == 0


def test_waiter_times_out() -> None:
    """A waiter whose leader takes longer than coalesce_timeout goes to the backend itself."""
    cache, metrics, clock = make_cache()
    leader = cache.lookup(AUTH, request())
    waiter = cache.lookup(AUTH, request())
    assert not waiter.called
    clock.advance(5.0)
    assert isinstance(result(waiter), Miss)
    fill(result(leader), b"hello")
    assert metrics.cache_misses_total.value == 2
    assert clock.getDelayedCalls() == []


def test_range_waiter_served_from_fill() -> None:
    """A Range GET that arrives during a fill waits for it and gets its 206 from the entry."""
    cache, metrics, _ = make_cache()
    leader = result(cache.lookup(AUTH, request()))
    waiter = cache.lookup(AUTH, request(headers={"Range": "bytes=1-2"}))
    fill(leader, b"hello")
    hit = result(waiter)
    assert isinstance(hit, Hit)
    assert hit.status == 206
    assert metrics.cache_hits_total.value == 1


def test_cancelled_waiter_counts_miss() -> None:
    """A waiter cancelled by its client's departure counts once, as a miss."""
    cache, metrics, clock = make_cache()
    leader = result(cache.lookup(AUTH, request()))
    waiter = cache.lookup(AUTH, request())
    waiter.cancel()
    waiter.addErrback(lambda _failure: None)
    fill(leader, b"hello")
    assert metrics.cache_misses_total.value == 2
    assert clock.getDelayedCalls() == []


# Invalidation and coherence.


def test_invalidate_evicts_all_versions() -> None:
    """invalidate drops the current and every versioned entry of the key."""
    cache, metrics, _ = make_cache()
    store(cache, "key", b"hello")
    fill(result(cache.lookup(AUTH, request(query=b"versionId=v1"))), b"one")
    store(cache, "other", b"keep")
    cache.invalidate("bucket", ["key"])
    assert len(cache) == 1
    assert ("bucket", "other", None) in cache
    assert metrics.cache_entries.value == 1


def test_fill_across_invalidation_not_stored() -> None:
    """A fill that began before an invalidation is not stored, so stale bytes cannot return."""
    cache, metrics, _ = make_cache()
    outcome = result(cache.lookup(AUTH, request()))
    assert isinstance(outcome, Miss)
    outcome.fill.start(200, response_headers(b"old"))
    outcome.fill.write(b"old")
    cache.invalidate("bucket", ["key"])
    outcome.fill.finish()
    assert len(cache) == 0
    assert isinstance(result(cache.lookup(AUTH, request())), Miss)


def test_fill_after_invalidation_stored() -> None:
    """A fill that began after the last invalidation is stored normally."""
    cache, _, _ = make_cache()
    cache.invalidate("bucket", ["key"])
    store(cache, "key", b"new")
    assert len(cache) == 1


def test_waiters_after_invalidation_refetch() -> None:
    """Waiters of a fill overtaken by an invalidation go to the backend; new GETs start afresh."""
    cache, metrics, _ = make_cache()
    leader = result(cache.lookup(AUTH, request()))
    waiter = cache.lookup(AUTH, request())
    cache.invalidate("bucket", ["key"])
    newcomer = result(cache.lookup(AUTH, request()))
    assert isinstance(newcomer, Miss)
    fill(leader, b"old")
    assert isinstance(result(waiter), Miss)
    fill(newcomer, b"new")
    hit = result(cache.lookup(AUTH, request()))
    assert b"".join(served(cache, hit).written) == b"new"


def test_subscription_loss_disables() -> None:
    """Losing the subscription empties the cache and stops caching until it is back."""
    cache, metrics, _ = make_cache()
    store(cache, "key", b"hello")
    cache.subscription_lost("connection reset")
    assert len(cache) == 0
    assert metrics.cache_bytes.value == 0
    outcome = result(cache.lookup(AUTH, request()))
    assert isinstance(outcome, Miss)
    fill(outcome, b"hello")
    assert len(cache) == 0
    cache.subscription_ready()
    store(cache, "key", b"hello")
    assert isinstance(result(cache.lookup(AUTH, request())), Hit)


def test_fill_across_subscription_loss() -> None:
    """A fill in progress when the subscription drops is not stored, even after it returns."""
    cache, _, _ = make_cache()
    outcome = result(cache.lookup(AUTH, request()))
    assert isinstance(outcome, Miss)
    outcome.fill.start(200, response_headers(b"old"))
    cache.subscription_lost("connection reset")
    cache.subscription_ready()
    outcome.fill.write(b"old")
    outcome.fill.finish()
    assert len(cache) == 0


class RecordingBus:
    """A bus that records publishes and subscriptions; each publish fires with ``confirmed``."""

    def __init__(self, confirmed: bool = True) -> None:
        self.confirmed = confirmed
        self.published: list[tuple[str, list[str] | None, bool]] = []
        self.listeners: list[object] = []

    def publish(self, bucket: str, keys: Iterable[str] | None, confirm: bool = True) -> Any:
        self.published.append((bucket, None if keys is None else list(keys), confirm))
        return succeed(self.confirmed)

    def serving_allowed(self) -> bool:
        return True

    def subscribe(self, listener: object) -> None:
        self.listeners.append(listener)

    def close(self) -> Deferred[None]:
        return succeed(None)


def test_disabled_still_publishes() -> None:
    """A proxy with the cache off publishes invalidations and subscribes for confirmations only."""
    bus = RecordingBus()
    cache = ObjectCache(Settings(enabled=False), FakeMetrics(), Clock(), bus)
    cache.startService()
    cache.invalidate("bucket", ["a", "b"])
    assert bus.published == [("bucket", ["a", "b"], True)]
    assert bus.listeners == [None]


def test_enabled_subscribes_itself() -> None:
    """An enabled cache is the listener of its bus."""
    bus = RecordingBus()
    cache = ObjectCache(Settings(), FakeMetrics(), Clock(), bus)
    cache.startService()
    assert bus.listeners == [cache]


@pytest.mark.parametrize(
    ("confirm", "confirmed", "counted"),
    [(True, True, 0), (True, False, 1), (False, False, 0), (False, True, 0)],
)
def test_unconfirmed_invalidations_counted(confirm: bool, confirmed: bool, counted: int) -> None:
    """Only an invalidation that asked for confirmations and lacks them counts as unconfirmed."""
    metrics = FakeMetrics()
    cache = ObjectCache(Settings(), metrics, Clock(), RecordingBus(confirmed))
    outcome: list[Any] = []
    cache.invalidate("bucket", ["key"], confirm=confirm).addBoth(outcome.append)
    assert outcome == [None]
    assert metrics.cache_invalidations_unconfirmed_total.value == counted


def test_render_head_keeps_length() -> None:
    """render returns the full body for a HEAD hit, so Content-Length is the object's size."""
    cache, _, _ = make_cache()
    store(cache, "key", b"hello")
    hit = result(cache.lookup(AUTH, request(method="HEAD")))
    assert isinstance(hit, Hit)
    status, headers, body = cache.render(hit)
    assert status == 200
    assert body == b"hello"
    assert (b"Accept-Ranges", [b"bytes"]) in headers


def test_render_not_modified() -> None:
    """render of a 304 has an empty body and only validator and caching headers."""
    cache, _, _ = make_cache()
    store(cache, "key", b"hello")
    hit = result(cache.lookup(AUTH, request(headers={"If-None-Match": '"abc"'})))
    assert isinstance(hit, Hit)
    status, headers, body = cache.render(hit)
    names = {name.lower() for name, _values in headers}
    assert status == 304
    assert body == b""
    assert names == {b"etag", b"last-modified"}
