"""
Verification of S3 request bodies while they stream through the proxy.

A verifier releases only bytes that are verified, and always holds back the end of the body
until ``finish()`` has checked the last chunk signature, the trailing checksum or the payload
hash. A backend therefore never receives the whole body of a request that fails verification.

Modes, chosen by ``x-amz-content-sha256``:

- a hex SHA-256: the body is hashed and compared in ``finish()``;
- ``UNSIGNED-PAYLOAD``: nothing is checked;
- ``STREAMING-AWS4-HMAC-SHA256-PAYLOAD``: aws-chunked with a signature per chunk, chained
  from the request signature;
- ``STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER``: the same plus a signed trailer that
  carries a checksum;
- ``STREAMING-UNSIGNED-PAYLOAD-TRAILER``: aws-chunked without chunk signatures, plus a
  trailer checksum.

Memory per request is bounded by one chunk (at most ``MAX_CHUNK_SIZE`` bytes) plus the
held-back tail.
"""

from __future__ import annotations

from typing import Protocol

__all__ = [
    "CHECKSUM_ALGORITHMS",
    "MAX_CHUNK_SIZE",
    "PayloadVerifier",
]

# The largest aws-chunked chunk accepted, in bytes. Clients choose the chunk size (botocore
# and the AWS SDKs use 64 KiB to 1 MiB); a larger chunk is rejected so that one chunk can be
# held in memory.
MAX_CHUNK_SIZE = 16 * 1024 * 1024

CHECKSUM_ALGORITHMS = ("crc32", "crc32c", "crc64nvme", "sha1", "sha256")
"""Checksum algorithms accepted in ``x-amz-checksum-<algorithm>`` trailers."""


class PayloadVerifier(Protocol):
    """
    Verifies one request body; created by ``RequestAuth.payload_verifier()``.

    ``feed`` and ``finish`` raise ``proxy.sigv4.AuthError`` when the body is invalid; after
    that the verifier must not be used again and the request must be aborted.
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
        :return: decoded bytes that are verified and may be forwarded; possibly empty.
        :raises AuthError: ``SignatureDoesNotMatch`` for a bad chunk signature,
            ``InvalidChunkSizeError`` or ``IncompleteBody`` for bad framing,
            ``EntityTooLarge`` for a chunk over ``MAX_CHUNK_SIZE``.
        """
        ...

    def finish(self) -> bytes:
        """
        Check the end of the body and release the held-back tail.

        :return: the remaining decoded bytes.
        :raises AuthError: ``XAmzContentSHA256Mismatch`` (400) for a wrong payload hash,
            ``SignatureDoesNotMatch`` (403) for a bad final chunk or trailer signature,
            ``BadDigest`` (400) for a wrong trailer checksum, ``IncompleteBody`` (400) for
            a truncated body or a length that differs from ``x-amz-decoded-content-length``.
        """
        ...

    def checksum_headers(self) -> dict[str, str]:
        """
        Return the verified ``x-amz-checksum-*`` values that a backend may receive as headers.

        Before ``finish()`` this holds only values the client sent as headers; after it, also
        the trailer checksums.
        """
        ...
