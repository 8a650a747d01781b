"""
Verification of S3 request bodies while they stream through the proxy.

A verifier releases only bytes that are verified, and always holds back the end of the body
until ``finish()`` has checked the last chunk signature, the trailing checksum or the payload
hash. A backend therefore never receives the whole body of a request that fails verification.

Modes, chosen by ``x-amz-content-sha256``:

- a hex SHA-256: the body is hashed and compared in ``finish()``;
- ``UNSIGNED-PAYLOAD``: nothing is checked (the last byte is still held back);
- ``STREAMING-AWS4-HMAC-SHA256-PAYLOAD``: aws-chunked with a signature per chunk, chained
  from the request signature;
- ``STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER``: the same plus a signed trailer that
  carries a checksum;
- ``STREAMING-UNSIGNED-PAYLOAD-TRAILER``: aws-chunked without chunk signatures, plus a
  trailer checksum.

Memory per request is bounded by one chunk (at most ``MAX_CHUNK_SIZE`` bytes) plus the bytes
passed to one ``feed()`` call.

Checksums: CRC32, SHA-1, SHA-256 and SHA-512 come from the standard library; CRC32C,
CRC64NVME and the XXHash family need the ``awscrt`` package (the library botocore uses for
them). A trailer naming an algorithm that cannot be computed is rejected before any body
byte is read, never accepted unverified.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import zlib
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Literal, Protocol

from proxy.sigv4 import (
    STREAMING_SIGNED,
    STREAMING_SIGNED_TRAILER,
    STREAMING_UNSIGNED_TRAILER,
    UNSIGNED_PAYLOAD,
    AuthError,
    chunk_string_to_sign,
    hmac_sha256_hex,
    trailer_string_to_sign,
)

if TYPE_CHECKING:
    from proxy.sigv4 import RequestAuth

try:
    from awscrt import checksums as _crt_checksums
except ImportError:  # pragma: no cover - depends on the environment
    _crt_checksums = None

__all__ = [
    "CHECKSUM_ALGORITHMS",
    "MAX_CHUNK_SIZE",
    "PayloadVerifier",
    "create_verifier",
    "is_checksum_header",
    "supported_checksum_algorithms",
    "validate_checksum_name",
]

# The largest aws-chunked chunk accepted, in bytes. Clients choose the chunk size: botocore
# uses 1 MiB and the AWS SDKs 64 KiB to 1 MiB. A larger chunk is rejected, because a whole
# chunk is held in memory until its signature is checked.
MAX_CHUNK_SIZE = 16 * 1024 * 1024

# Maximum length of a chunk-size line: a hex size, ";chunk-signature=" and 64 hex digits,
# with room for other extensions.
_MAX_CHUNK_LINE = 4096
# Maximum size of the trailer section, in bytes.
_MAX_TRAILER_SECTION = 16 * 1024

CHECKSUM_ALGORITHMS = (
    "crc32",
    "crc32c",
    "crc64nvme",
    "sha1",
    "sha256",
    "sha512",
    "xxhash64",
    "xxhash3",
    "xxhash128",
)
"""Algorithms S3 accepts in ``x-amz-checksum-<algorithm>``."""

_CHECKSUM_PREFIX = "x-amz-checksum-"
_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_HEX_SIZE = re.compile(rb"^[0-9a-fA-F]{1,16}$")
_TRAILER_SIGNATURE = "x-amz-trailer-signature"


# --- checksums ---


class _Checksum(Protocol):
    def update(self, data: bytes) -> None: ...

    def digest(self) -> bytes: ...


class _Crc:
    """A running CRC computed by ``function(data, previous)``, digested big-endian."""

    def __init__(self, function: Callable[[bytes, int], int], size: int) -> None:
        self._function = function
        self._size = size
        self._value = 0

    def update(self, data: bytes) -> None:
        self._value = self._function(data, self._value)

    def digest(self) -> bytes:
        return self._value.to_bytes(self._size, "big")


class _CrtHash:
    """An awscrt XXHash behind the hashlib-like interface."""

    def __init__(self, factory: Callable[[], object]) -> None:
        self._hash = factory()
        self._digest: bytes | None = None

    def update(self, data: bytes) -> None:
        self._hash.update(data)  # type: ignore[attr-defined]  # awscrt ships no stubs

    def digest(self) -> bytes:
        if self._digest is None:
            self._digest = self._hash.finalize()  # type: ignore[attr-defined]
        return self._digest


def _checksum_factories() -> dict[str, Callable[[], _Checksum]]:
    factories: dict[str, Callable[[], _Checksum]] = {
        "crc32": lambda: _Crc(zlib.crc32, 4),
        "sha1": hashlib.sha1,
        "sha256": hashlib.sha256,
        "sha512": hashlib.sha512,
    }
    crt = _crt_checksums
    if crt is not None:
        factories["crc32c"] = lambda: _Crc(crt.crc32c, 4)
        factories["crc64nvme"] = lambda: _Crc(crt.crc64nvme, 8)
        xxhash = getattr(crt, "XXHash", None)
        if xxhash is not None:
            factories["xxhash64"] = lambda: _CrtHash(xxhash.new_xxhash64)
            factories["xxhash3"] = lambda: _CrtHash(xxhash.new_xxhash3_64)
            factories["xxhash128"] = lambda: _CrtHash(xxhash.new_xxhash3_128)
    return factories


_CHECKSUM_FACTORIES = _checksum_factories()


def supported_checksum_algorithms() -> tuple[str, ...]:
    """Return the checksum algorithms this process can verify (depends on ``awscrt``)."""
    return tuple(name for name in CHECKSUM_ALGORITHMS if name in _CHECKSUM_FACTORIES)


def is_checksum_header(name: str) -> bool:
    """True for ``x-amz-checksum-<algorithm>`` names (not ``x-amz-checksum-type`` and the like)."""
    return (
        name.startswith(_CHECKSUM_PREFIX) and name[len(_CHECKSUM_PREFIX) :] in CHECKSUM_ALGORITHMS
    )


def validate_checksum_name(name: str, where: Literal["trailer"]) -> str:
    """
    Check that a trailer announced in ``x-amz-trailer`` is a checksum this process verifies.

    :param name: lower-case header name, for example ``x-amz-checksum-crc32``.
    :param where: where the name came from, for the error message.
    :return: the algorithm, for example ``crc32``.
    :raises AuthError: ``InvalidRequest`` (400) for any other trailer or an algorithm that
        needs the missing ``awscrt`` package.
    """
    algorithm = name[len(_CHECKSUM_PREFIX) :] if name.startswith(_CHECKSUM_PREFIX) else ""
    if algorithm in _CHECKSUM_FACTORIES:
        return algorithm
    if algorithm in CHECKSUM_ALGORITHMS:
        reason = "this proxy cannot compute it because the awscrt package is not installed"
    else:
        reason = "only x-amz-checksum-<algorithm> trailers are accepted"
    raise AuthError(
        "InvalidRequest",
        f"The {where} {name!r} is not supported: {reason}. Supported: "
        f"{', '.join(_CHECKSUM_PREFIX + a for a in supported_checksum_algorithms())}.",
        400,
    )


# --- verifiers ---


class PayloadVerifier(Protocol):
    """
    Verifies one request body; created by ``RequestAuth.payload_verifier()``.

    ``feed`` and ``finish`` raise ``proxy.sigv4.AuthError`` when the body is invalid; after
    that every further call raises the same error, and the request must be aborted.
    """

    @property
    def decoded_length(self) -> int:
        """Number of decoded body bytes seen so far (all of them after ``finish()``)."""
        ...

    @property
    def trailers(self) -> dict[str, str]:
        """Trailer headers (lower-case names) received after the last chunk; empty before."""
        ...

    def feed(self, data: bytes) -> bytes:
        """
        Consume the next bytes of the body as received.

        :param data: raw body bytes (aws-chunked framing included, if any).
        :return: decoded bytes that are verified and may be forwarded; possibly empty. A
            call that raises releases nothing, not even chunks it verified before failing.
        :raises AuthError: ``SignatureDoesNotMatch`` (403) for a bad chunk signature,
            ``InvalidRequest`` (400) for bad aws-chunked framing or more bytes than
            ``x-amz-decoded-content-length``, ``EntityTooLarge`` (400) for a chunk over
            ``MAX_CHUNK_SIZE``, ``MalformedTrailerError`` (400) for a bad trailer.
        """
        ...

    def finish(self) -> bytes:
        """
        Check the end of the body and release the held-back tail.

        :return: the remaining decoded bytes.
        :raises AuthError: ``XAmzContentSHA256Mismatch`` (400) for a wrong payload hash,
            ``SignatureDoesNotMatch`` (403) for a bad final chunk or trailer signature,
            ``BadDigest`` (400) for a wrong trailer checksum, ``IncompleteBody`` (400) for
            a truncated body or fewer bytes than ``x-amz-decoded-content-length``,
            ``MalformedTrailerError`` (400) for an announced trailer that is missing.
        """
        ...

    def checksum_headers(self) -> dict[str, str]:
        """
        Return the ``x-amz-checksum-*`` values that a backend may receive as headers.

        Before ``finish()`` this holds only values the client sent as headers; after it, also
        the verified trailer checksums.
        """
        ...


def create_verifier(auth: RequestAuth) -> PayloadVerifier:
    """
    Create the body verifier for a verified request.

    :param auth: the result of ``proxy.sigv4.verify_request``.
    :return: a fresh verifier for ``auth.content_sha256``.
    """
    mode = auth.content_sha256
    if mode in (STREAMING_SIGNED, STREAMING_SIGNED_TRAILER, STREAMING_UNSIGNED_TRAILER):
        return _AwsChunkedVerifier(auth)
    if mode == UNSIGNED_PAYLOAD:
        return _PlainVerifier(None, auth.checksum_headers)
    return _PlainVerifier(mode.lower(), auth.checksum_headers)


class _HeldTail:
    """Releases verified bytes except the last one, which waits for ``release_all``."""

    def __init__(self) -> None:
        self._held = b""

    def push(self, data: bytes) -> bytes:
        if not data:
            return b""
        released = self._held + data[:-1]
        self._held = data[-1:]
        return released

    def release_all(self) -> bytes:
        held, self._held = self._held, b""
        return held


class _VerifierBase:
    def __init__(self, checksum_headers: Mapping[str, str]) -> None:
        self._tail = _HeldTail()
        self._decoded_length = 0
        self._trailers: dict[str, str] = {}
        self._header_checksums = dict(checksum_headers)
        self._error: AuthError | None = None
        self._finished = False

    @property
    def decoded_length(self) -> int:
        return self._decoded_length

    @property
    def trailers(self) -> dict[str, str]:
        return dict(self._trailers)

    def checksum_headers(self) -> dict[str, str]:
        result = dict(self._header_checksums)
        if self._finished:
            result.update({k: v for k, v in self._trailers.items() if is_checksum_header(k)})
        return result

    def _check_usable(self) -> None:
        if self._error is not None:
            raise self._error
        if self._finished:
            raise RuntimeError("this payload verifier has already finished")

    def _fail(self, error: AuthError) -> AuthError:
        self._error = error
        return error


class _PlainVerifier(_VerifierBase):
    """A body sent as is: hashed against a literal SHA-256, or not checked at all."""

    def __init__(self, expected_sha256: str | None, checksum_headers: Mapping[str, str]) -> None:
        super().__init__(dict(checksum_headers))
        self._expected = expected_sha256
        self._hash = hashlib.sha256() if expected_sha256 is not None else None

    def feed(self, data: bytes) -> bytes:
        self._check_usable()
        if self._hash is not None:
            self._hash.update(data)
        self._decoded_length += len(data)
        return self._tail.push(data)

    def finish(self) -> bytes:
        self._check_usable()
        if self._hash is not None and self._expected is not None:
            computed = self._hash.hexdigest()
            if not hmac.compare_digest(computed, self._expected):
                raise self._fail(
                    AuthError(
                        "XAmzContentSHA256Mismatch",
                        "The provided 'x-amz-content-sha256' header does not match what was "
                        "computed from the body.",
                        400,
                        {
                            "ClientComputedContentSHA256": self._expected,
                            "S3ComputedContentSHA256": computed,
                        },
                    )
                )
        self._finished = True
        return self._tail.release_all()


_State = Literal["size_line", "data", "data_end", "trailer", "done"]


class _AwsChunkedVerifier(_VerifierBase):
    """
    Decodes an aws-chunked body and verifies chunk signatures and trailer checksums.

    Wire format, every line ending in CRLF: a line ``<hex size>[;chunk-signature=<sig>]``,
    the chunk data and an empty line, repeated. The last chunk has size 0 and no data. Then
    come trailer lines ``name:value`` (plus ``x-amz-trailer-signature:<sig>`` when signed)
    and an empty line.
    """

    def __init__(self, auth: RequestAuth) -> None:
        super().__init__(dict(auth.checksum_headers))
        mode = auth.content_sha256
        self._signed = mode in (STREAMING_SIGNED, STREAMING_SIGNED_TRAILER)
        self._with_trailer = mode in (STREAMING_SIGNED_TRAILER, STREAMING_UNSIGNED_TRAILER)
        self._signing_key = auth.signing_key
        self._amz_date = auth.amz_date
        self._scope = auth.scope
        self._previous_signature = auth.signature
        self._expected_length = auth.decoded_content_length
        self._announced = auth.trailer_names
        self._checksums: dict[str, _Checksum] = {
            name: _CHECKSUM_FACTORIES[validate_checksum_name(name, "trailer")]()
            for name in self._announced
        }

        self._buffer = bytearray()
        self._state: _State = "size_line"
        self._chunk_index = 0
        self._chunk_remaining = 0
        self._chunk_signature = ""
        self._chunk_hash = hashlib.sha256()
        self._chunk_pieces: list[bytes] = []
        self._raw_offset = 0
        self._trailer_bytes = 0
        self._trailer_signature: str | None = None

    def feed(self, data: bytes) -> bytes:
        self._check_usable()
        try:
            return self._consume(data)
        except AuthError as error:
            raise self._fail(error) from None

    def finish(self) -> bytes:
        self._check_usable()
        try:
            self._check_complete()
        except AuthError as error:
            raise self._fail(error) from None
        self._finished = True
        return self._tail.release_all()

    # Each feed parses one bytes object and keeps only the unparsed rest (at most a partial
    # line), so a large feed is not copied again for every chunk it contains.
    def _consume(self, data: bytes) -> bytes:
        buffer = bytes(self._buffer) + data if self._buffer else bytes(data)
        view = memoryview(buffer)
        position = 0
        released = []
        while True:
            if self._state == "size_line":
                end = buffer.find(b"\r\n", position)
                if end == -1:
                    if len(buffer) - position > _MAX_CHUNK_LINE:
                        raise self._malformed(position, "the chunk-size line is too long")
                    break
                self._start_chunk(buffer[position:end], position)
                position = end + 2
            elif self._state == "data":
                available = min(self._chunk_remaining, len(buffer) - position)
                if available == 0:
                    break
                piece = view[position : position + available]
                position += available
                self._chunk_remaining -= available
                if self._signed:
                    self._chunk_hash.update(piece)
                    self._chunk_pieces.append(bytes(piece))
                else:
                    released.append(self._accept(bytes(piece)))
                if self._chunk_remaining == 0:
                    self._state = "data_end"
            elif self._state == "data_end":
                if len(buffer) - position < 2:
                    break
                if buffer[position : position + 2] != b"\r\n":
                    raise self._malformed(position, "chunk data is not followed by CRLF")
                position += 2
                if self._signed:
                    chunk = b"".join(self._chunk_pieces)
                    self._chunk_pieces = []
                    self._verify_chunk(len(chunk), self._chunk_hash.hexdigest())
                    released.append(self._accept(chunk))
                self._state = "size_line"
            elif self._state == "trailer":
                end = buffer.find(b"\r\n", position)
                if end == -1:
                    if self._trailer_bytes + len(buffer) - position > _MAX_TRAILER_SECTION:
                        raise self._trailer_error("the trailer section is too large")
                    break
                line = buffer[position:end]
                position = end + 2
                self._trailer_bytes += len(line) + 2
                if self._trailer_bytes > _MAX_TRAILER_SECTION:
                    raise self._trailer_error("the trailer section is too large")
                if line:
                    self._add_trailer(line)
                else:
                    self._end_trailers()
            else:
                if position < len(buffer):
                    raise self._malformed(position, "data follows the end of the aws-chunked body")
                break
        view.release()
        self._raw_offset += position
        self._buffer = bytearray(buffer[position:])
        return b"".join(released)

    def _start_chunk(self, line: bytes, position: int) -> None:
        size_text, _, extension = line.partition(b";")
        size_text = size_text.strip()
        if not _HEX_SIZE.match(size_text):
            raise self._malformed(position, f"invalid chunk size {size_text[:32]!r}")
        size = int(size_text, 16)
        if size > MAX_CHUNK_SIZE:
            raise AuthError(
                "EntityTooLarge",
                f"aws-chunked chunk {self._chunk_index} has {size} bytes; this proxy accepts "
                f"chunks of at most {MAX_CHUNK_SIZE} bytes. Use a smaller chunk size.",
                400,
                {"MaxChunkSizeAllowed": str(MAX_CHUNK_SIZE)},
            )
        if self._signed:
            name, _, signature = extension.partition(b"=")
            if name.strip() != b"chunk-signature" or not signature:
                raise AuthError(
                    "SignatureDoesNotMatch",
                    f"aws-chunked chunk {self._chunk_index} has no chunk-signature.",
                    403,
                )
            self._chunk_signature = signature.strip().decode("latin-1")
        if size == 0:
            if self._signed:
                self._verify_chunk(0, _EMPTY_SHA256)
            self._state = "trailer"
        else:
            self._chunk_remaining = size
            self._chunk_hash = hashlib.sha256()
            self._state = "data"

    def _verify_chunk(self, size: int, chunk_sha256: str) -> None:
        string_to_sign = chunk_string_to_sign(
            self._amz_date, self._scope, self._previous_signature, chunk_sha256
        )
        expected = hmac_sha256_hex(self._signing_key, string_to_sign)
        if not _signatures_equal(expected, self._chunk_signature):
            raise AuthError(
                "SignatureDoesNotMatch",
                f"The signature of aws-chunked chunk {self._chunk_index} "
                f"({size} bytes) does not match the chunk data.",
                403,
                {"StringToSign": string_to_sign},
            )
        self._previous_signature = expected
        self._chunk_index += 1

    def _accept(self, data: bytes) -> bytes:
        """Count and checksum verified decoded bytes, and return what may be released now."""
        self._decoded_length += len(data)
        if self._expected_length is not None and self._decoded_length > self._expected_length:
            raise AuthError(
                "InvalidRequest",
                f"The decoded body is longer than x-amz-decoded-content-length "
                f"{self._expected_length}.",
                400,
            )
        for checksum in self._checksums.values():
            checksum.update(data)
        return self._tail.push(data)

    def _add_trailer(self, line: bytes) -> None:
        name_bytes, colon, value_bytes = line.partition(b":")
        name = name_bytes.strip().decode("latin-1").lower()
        value = value_bytes.strip().decode("latin-1")
        if not colon or not name:
            raise self._trailer_error(f"the trailer line {line[:64]!r} is not 'name:value'")
        if name == _TRAILER_SIGNATURE:
            if not self._signed:
                raise self._trailer_error(f"{_TRAILER_SIGNATURE} sent with an unsigned payload")
            self._trailer_signature = value
            return
        if not self._with_trailer or name not in self._announced:
            raise self._trailer_error(f"the trailer {name!r} was not announced in x-amz-trailer")
        if name in self._trailers:
            raise self._trailer_error(f"the trailer {name!r} was sent twice")
        self._trailers[name] = value

    def _end_trailers(self) -> None:
        if self._signed and self._with_trailer:
            canonical = b"".join(
                f"{name}:{value}\n".encode("latin-1")
                for name, value in sorted(self._trailers.items())
            )
            string_to_sign = trailer_string_to_sign(
                self._amz_date, self._scope, self._previous_signature, canonical
            )
            expected = hmac_sha256_hex(self._signing_key, string_to_sign)
            if self._trailer_signature is None or not _signatures_equal(
                expected, self._trailer_signature
            ):
                raise AuthError(
                    "SignatureDoesNotMatch",
                    "The x-amz-trailer-signature is missing or does not match the trailers.",
                    403,
                    {"StringToSign": string_to_sign},
                )
        self._state = "done"

    def _check_complete(self) -> None:
        # Without a trailer, some clients end the body right after the final chunk's line.
        lenient_end = (
            self._state == "trailer"
            and not self._with_trailer
            and not self._buffer
            and self._trailer_bytes == 0
        )
        if self._state != "done" and not lenient_end:
            raise AuthError(
                "IncompleteBody",
                f"The aws-chunked body ended early (in state {self._state!r} after "
                f"{self._decoded_length} decoded bytes).",
                400,
            )
        if self._expected_length is not None and self._decoded_length != self._expected_length:
            raise AuthError(
                "IncompleteBody",
                f"The decoded body has {self._decoded_length} bytes but "
                f"x-amz-decoded-content-length is {self._expected_length}.",
                400,
            )
        for name, checksum in self._checksums.items():
            if name not in self._trailers:
                raise self._trailer_error(f"the announced trailer {name!r} is missing")
            _check_checksum(name, self._trailers[name], checksum.digest())

    def _malformed(self, position: int, reason: str) -> AuthError:
        return AuthError(
            "InvalidRequest",
            f"The aws-chunked body is malformed at byte {self._raw_offset + position}: {reason}.",
            400,
        )

    def _trailer_error(self, reason: str) -> AuthError:
        return AuthError(
            "MalformedTrailerError",
            f"The request contained trailing data that was not well-formed: {reason}.",
            400,
        )


def _signatures_equal(expected: str, provided: str) -> bool:
    try:
        return hmac.compare_digest(expected.encode("ascii"), provided.encode("ascii"))
    except UnicodeEncodeError:
        return False


def _check_checksum(name: str, value: str, computed: bytes) -> None:
    try:
        provided = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise AuthError(
            "InvalidRequest",
            f"Value for {name} trailing header is invalid: {value!r} is not base64.",
            400,
        ) from None
    if not hmac.compare_digest(provided, computed):
        algorithm = name[len(_CHECKSUM_PREFIX) :].upper()
        raise AuthError(
            "BadDigest",
            f"The {algorithm} you specified did not match the calculated checksum.",
            400,
            {"ChecksumName": name},
        )
