"""Metric stores: the shared Redis layout and an embedded single-process store.

Redis layout, for namespace ``ns`` (every key carries the hash tag ``{ns}`` so that a
Redis Cluster keeps them in one slot and one Lua script may touch them all):

``{ns}:meta``
    hash, family name -> schema JSON (type, label names, buckets, gauge mode).
``{ns}:help``
    hash, family name -> help text of the most recently started writer.
``{ns}:family:<name>``
    hash per family, whose fields are JSON arrays of the label values in definition order.
    A counter field is ``[label values...]`` and its value is the total.
    A histogram has one field ``[label values..., <bucket index>]`` per bucket with a
    non-cumulative count (the last index is ``+Inf``), plus ``[label values..., "sum"]``
    and ``[label values..., "count"]``.
    A gauge field is ``[writer id, label values...]`` and its value is
    ``"<value> <timestamp>"``.
``{ns}:heartbeat``
    sorted set, writer id -> last flush time (seconds since the epoch, writer's clock).
``{ns}:sequence``
    hash, writer id -> sequence number of the last batch applied.
``{ns}:sequence_seen``
    sorted set, writer id -> last time the writer sent a batch; sequence records older
    than the retention are removed by :meth:`RedisStore.prune`.

Since a histogram's buckets, sum and count change in one script call and live in one
hash, one ``HGETALL`` always returns a consistent series.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol
from urllib.parse import urlsplit, urlunsplit

import redis

from collector.buffer import Batch
from collector.connection import HA_SCHEMES, LazyCluster, open_ha_client
from collector.definitions import MetricDefinition

__all__ = [
    "ApplyResult",
    "EmbeddedStore",
    "MetricStore",
    "RedisStore",
    "ReplicationError",
    "SchemaConflictError",
    "Snapshot",
    "batch_operations",
    "decode_field",
    "encode_field",
    "open_redis",
    "redact_url",
]

# Default time after which a writer's sequence record is removed, in seconds. A writer
# that cannot reach Redis for longer than this and then resends a batch whose reply was
# lost would have that batch applied twice.
SEQUENCE_RETENTION = 7 * 24 * 3600.0


class ReplicationError(redis.RedisError):
    """A batch was applied on the primary but fewer replicas than required confirmed it."""


class SchemaConflictError(ValueError):
    """A definition differs from the one stored in Redis under the same name."""


class ApplyResult(NamedTuple):
    """The outcome of :meth:`MetricStore.apply`.

    :ivar applied: false when the batch had been applied before (a resend).
    :ivar failed_operations: operations that Redis rejected, e.g. an increment of a field
        that contains no number. The rest of the batch is applied.
    :ivar metadata_missing: true when the store has no definitions, e.g. after Redis
        lost its data; the writer should register its definitions again.
    """

    applied: bool
    failed_operations: int = 0
    metadata_missing: bool = False


@dataclass
class Snapshot:
    """The result of one :meth:`MetricStore.read`.

    :ivar schemas: family name -> stored schema JSON.
    :ivar help: family name -> stored help text.
    :ivar families: family name -> field -> value, for the families requested that exist.
    :ivar heartbeats: writer id -> last flush time in seconds.
    :ivar undecodable: family name -> number of fields or values that were not UTF-8,
        plus one when the family's key could not be read (e.g. it is not a hash).
    """

    schemas: dict[str, str] = field(default_factory=dict)
    help: dict[str, str] = field(default_factory=dict)
    families: dict[str, dict[str, str]] = field(default_factory=dict)
    heartbeats: dict[str, float] = field(default_factory=dict)
    undecodable: dict[str, int] = field(default_factory=dict)


class MetricStore(Protocol):
    """Storage for metric deltas shared by writers and read by collectors.

    Every method blocks and runs in a thread (or in tests, synchronously).
    """

    def register(self, definitions: Sequence[MetricDefinition]) -> None:
        """Store definitions, or raise :class:`SchemaConflictError` when one differs."""

    def apply(self, batch: Batch, now: float) -> ApplyResult:
        """Apply ``batch`` once and record the writer's heartbeat at ``now`` (seconds)."""

    def read(self, names: Sequence[str]) -> Snapshot:
        """Read the metadata, heartbeats and the families named ``names``."""

    def prune(
        self,
        stale: Mapping[str, Sequence[tuple[str, str]]],
        cutoff: float,
        sequence_cutoff: float,
    ) -> int:
        """Remove writers whose heartbeat is older than ``cutoff``, with their gauge fields.

        :param stale: writer id -> ``(family name, field)`` of its gauge values.
        :param cutoff: a writer is removed only if its heartbeat is missing or older.
        :param sequence_cutoff: sequence records last seen before this are removed.
        :return: the number of writers removed.
        """


def encode_field(values: Iterable[str | int]) -> str:
    """Return the canonical field for a series: a compact JSON array."""
    return json.dumps(list(values), ensure_ascii=False, separators=(",", ":"))


def decode_field(text: str) -> list[Any]:
    """Parse a field written by :func:`encode_field`.

    :raises ValueError: when ``text`` is not a JSON array.
    """
    values = json.loads(text)
    if not isinstance(values, list):
        raise ValueError(f"field {text!r} is not a JSON array")
    return values


def batch_operations(batch: Batch) -> list[tuple[str, str, str, str]]:
    """Translate a batch into ``(operation, family, field, value)`` tuples.

    Operations: ``f`` adds a float (HINCRBYFLOAT), ``i`` adds an integer (HINCRBY), ``s``
    sets a value (HSET) and ``d`` deletes a field (HDEL). Zero deltas are left out.
    """
    operations: list[tuple[str, str, str, str]] = []
    for (name, labels), amount in batch.counters.items():
        if amount:
            operations.append(("f", name, encode_field(labels), repr(float(amount))))

    for (name, labels), delta in batch.histograms.items():
        for index, count in enumerate(delta.buckets):
            if count:
                operations.append(("i", name, encode_field((*labels, index)), str(count)))
        operations.append(("f", name, encode_field((*labels, "sum")), repr(float(delta.sum))))
        operations.append(("i", name, encode_field((*labels, "count")), str(delta.count)))

    for key, value in batch.gauges.items():
        name, labels = key
        gauge_field = encode_field((batch.writer, *labels))
        if batch.retire:
            operations.append(("d", name, gauge_field, ""))
        else:
            stamp = float(batch.gauge_times.get(key, batch.created))
            operations.append(("s", name, gauge_field, f"{float(value)!r} {stamp!r}"))
    return operations


def redact_url(url: str) -> str:
    """Return ``url`` with its password replaced by ``***``, for messages and logs."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.netloc.rpartition("@")[2]
        user = parts.username or ""
        return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
    except ValueError:
        return "<unparseable URL>"


def open_redis(url: str, timeout: float = 5.0) -> Any:
    """Create a client for ``url`` (``redis://``, ``rediss://`` or ``unix://``).

    The URL may carry a user, a password and a database number, as redis-py's
    ``Redis.from_url`` accepts them. ``redis+sentinel://`` and ``redis+cluster://`` URLs
    get the clients of :func:`collector.connection.open_ha_client`. No connection is made
    here.

    :param timeout: socket connect and read timeout, in seconds, unless the URL sets one.
    :raises ValueError: when the URL is invalid; the message shows it without password.
    """
    redacted = redact_url(url)
    try:
        parts = urlsplit(url)
        if parts.scheme in HA_SCHEMES:
            return open_ha_client(url, timeout)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ValueError("the scheme must be redis://, rediss:// or unix://")
        if parts.scheme != "unix":
            database = parts.path.lstrip("/")
            if database and not database.isdigit():
                raise ValueError(f"the database {database!r} is not a number")
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number
        return redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    except (ValueError, TypeError) as err:
        reason = str(err)
        password = _password(url)
        if password:
            reason = reason.replace(password, "***")
        raise ValueError(
            f"Redis URL {redacted!r} is invalid: {reason}; "
            "use redis://[user:password@]host:port/db, rediss://..., unix:///path, "
            "redis+sentinel://host:port[,host:port]/service[/db] or "
            "redis+cluster://host:port[,host:port]"
        ) from None


def _password(url: str) -> str | None:
    try:
        return urlsplit(url).password
    except ValueError:
        return None


# Applies one batch atomically, once per (writer, sequence).
# KEYS: sequence hash, sequence_seen zset, heartbeat zset, meta hash, then the family
#   hashes.
# ARGV: writer, sequence, now, retire ("1" or "0"), then groups of four:
#   operation, index into KEYS, field, value.
# Returns {applied (0 or 1), operations that Redis rejected, meta hash exists (0 or 1)}.
_APPLY_LUA = """
local writer = ARGV[1]
local sequence = tonumber(ARGV[2])
local retire = ARGV[4] == '1'
redis.call('ZADD', KEYS[2], ARGV[3], writer)
if retire then
  redis.call('ZREM', KEYS[3], writer)
else
  redis.call('ZADD', KEYS[3], ARGV[3], writer)
end
local last = tonumber(redis.call('HGET', KEYS[1], writer) or '0') or 0
if sequence <= last then
  return {0, 0, redis.call('EXISTS', KEYS[4])}
end
local failed = 0
for i = 5, #ARGV, 4 do
  local op = ARGV[i]
  local key = KEYS[tonumber(ARGV[i + 1])]
  local reply
  if op == 'f' then
    reply = redis.pcall('HINCRBYFLOAT', key, ARGV[i + 2], ARGV[i + 3])
  elseif op == 'i' then
    reply = redis.pcall('HINCRBY', key, ARGV[i + 2], ARGV[i + 3])
  elseif op == 's' then
    reply = redis.pcall('HSET', key, ARGV[i + 2], ARGV[i + 3])
  else
    reply = redis.pcall('HDEL', key, ARGV[i + 2])
  end
  if type(reply) == 'table' and reply.err then
    failed = failed + 1
  end
end
if retire then
  -- A retiring writer sends nothing after this batch, so its sequence record is done.
  redis.call('HDEL', KEYS[1], writer)
  redis.call('ZREM', KEYS[2], writer)
else
  redis.call('HSET', KEYS[1], writer, ARGV[2])
end
return {1, failed, redis.call('EXISTS', KEYS[4])}
"""

# Stores definitions unless one conflicts; writes nothing on a conflict.
# KEYS: meta hash, help hash. ARGV: groups of name, schema, help.
# Returns {} or {name, stored schema} of the first conflict.
_REGISTER_LUA = """
for i = 1, #ARGV, 3 do
  local stored = redis.call('HGET', KEYS[1], ARGV[i])
  if stored and stored ~= ARGV[i + 1] then
    return {ARGV[i], stored}
  end
end
for i = 1, #ARGV, 3 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 2])
end
return {}
"""

# Removes stale writers and their gauge fields, checking staleness again atomically so
# that a writer which came back in the meantime keeps its values.
# KEYS: heartbeat zset, sequence hash, sequence_seen zset, then gauge family hashes.
# ARGV: cutoff, sequence cutoff, then per writer: writer, n, then n pairs (key index, field).
_PRUNE_LUA = """
local cutoff = tonumber(ARGV[1])
local removed = 0
local i = 3
while i <= #ARGV do
  local writer = ARGV[i]
  local n = tonumber(ARGV[i + 1])
  local score = redis.call('ZSCORE', KEYS[1], writer)
  local stale = (not score) or tonumber(score) < cutoff
  if stale then
    redis.call('ZREM', KEYS[1], writer)
    for j = 0, n - 1 do
      redis.call('HDEL', KEYS[tonumber(ARGV[i + 2 + 2 * j])], ARGV[i + 3 + 2 * j])
    end
    removed = removed + 1
  end
  i = i + 2 + 2 * n
end
local old = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', '(' .. ARGV[2])
for _, writer in ipairs(old) do
  redis.call('HDEL', KEYS[2], writer)
  redis.call('ZREM', KEYS[3], writer)
end
return removed
"""


def check_namespace(namespace: str) -> None:
    """Raise ValueError when ``namespace`` cannot prefix and hash-tag the Redis keys."""
    if not namespace or any(char in namespace for char in "{}\n\r "):
        raise ValueError(
            f"metrics namespace {namespace!r} is invalid; give a non-empty name "
            "without braces or whitespace"
        )


def _conflict(name: str, stored: str, ours: str, where: str) -> SchemaConflictError:
    return SchemaConflictError(
        f"metric {name!r} is stored in {where} as {stored} but this process defines it as "
        f"{ours}; use another namespace, or stop every writer of the old definition and "
        f"delete field {name!r} of the metadata hash"
    )


class RedisStore:
    """A :class:`MetricStore` on a Redis server shared by every writer and collector.

    :param client: a redis-py client (``Redis``, a Sentinel primary client or a
        :class:`~collector.connection.LazyCluster`); its calls block, so every method runs
        in a thread.
    :param namespace: the deployment name used as hash tag; default ``s3proxy``.
    :param wait_replicas: when > 0, :meth:`apply` counts a batch as written only after
        this many replicas acknowledged it (Redis ``WAIT``), so that a failover cannot
        lose a batch that the writer already dropped. Default 0: the primary's reply is
        enough.
    :param wait_timeout: seconds ``WAIT`` waits for the replicas; default 1.
    :raises ValueError: for an invalid namespace or wait settings, or ``wait_replicas``
        with a cluster client.
    """

    def __init__(
        self,
        client: Any,
        namespace: str = "s3proxy",
        wait_replicas: int = 0,
        wait_timeout: float = 1.0,
    ) -> None:
        check_namespace(namespace)
        if wait_replicas < 0 or not wait_timeout > 0:
            raise ValueError(
                f"wait_replicas {wait_replicas!r} or wait_timeout {wait_timeout!r} is "
                "invalid; give replicas >= 0 and a timeout > 0 seconds"
            )
        if wait_replicas and isinstance(client, LazyCluster):
            raise ValueError(
                "wait_replicas is not supported with Redis Cluster; set it to 0"
            )
        self.wait_replicas = wait_replicas
        self.wait_timeout = wait_timeout
        self.client = client
        self.namespace = namespace
        prefix = "{" + namespace + "}:"
        self.prefix = prefix
        self.meta_key = prefix + "meta"
        self.help_key = prefix + "help"
        self.heartbeat_key = prefix + "heartbeat"
        self.sequence_key = prefix + "sequence"
        self.sequence_seen_key = prefix + "sequence_seen"
        self._apply_script = client.register_script(_APPLY_LUA)
        self._register_script = client.register_script(_REGISTER_LUA)
        self._prune_script = client.register_script(_PRUNE_LUA)

    def family_key(self, name: str) -> str:
        """Return the key of the hash of family ``name``."""
        return f"{self.prefix}family:{name}"

    def register(self, definitions: Sequence[MetricDefinition]) -> None:
        """Store ``definitions`` in the metadata hash (runs in a thread).

        :raises SchemaConflictError: when a stored schema differs; nothing is stored then.
        :raises redis.RedisError: when Redis cannot be reached.
        """
        args: list[str] = []
        for definition in definitions:
            args += [definition.name, definition.schema(), definition.help]
        reply = self._register_script(keys=[self.meta_key, self.help_key], args=args)
        if reply:
            name, stored = (item.decode("utf-8", "replace") for item in reply)
            ours = next(d.schema() for d in definitions if d.name == name)
            raise _conflict(name, stored, ours, f"Redis key {self.meta_key!r}")

    def apply(self, batch: Batch, now: float) -> ApplyResult:
        """Apply ``batch`` in one script call (runs in a thread).

        The script applies the batch only if its sequence is greater than the writer's
        last applied one, so resending a batch after a lost reply applies it once.

        :raises redis.RedisError: when the call fails; the batch may or may not have
            been applied, and resending it is safe.
        """
        keys = [self.sequence_key, self.sequence_seen_key, self.heartbeat_key, self.meta_key]
        key_index: dict[str, int] = {}
        args: list[str | int | float] = [
            batch.writer,
            batch.sequence,
            repr(float(now)),
            "1" if batch.retire else "0",
        ]
        for operation, name, series_field, value in batch_operations(batch):
            index = key_index.get(name)
            if index is None:
                keys.append(self.family_key(name))
                index = key_index[name] = len(keys)
            args += [operation, index, series_field, value]
        if not self.wait_replicas:
            applied, failed, metadata_exists = self._apply_script(keys=keys, args=args)
            return ApplyResult(bool(applied), int(failed), not metadata_exists)

        # WAIT covers the writes of its own connection only, so the script and WAIT go
        # through one pipeline. A resend that the script skips still writes the
        # heartbeat, so its WAIT also covers the first, unacknowledged attempt.
        with self.client.pipeline(transaction=False) as pipe:
            self._apply_script(keys=keys, args=args, client=pipe)
            pipe.wait(self.wait_replicas, int(self.wait_timeout * 1000))
            (applied, failed, metadata_exists), acknowledged = pipe.execute()
        if acknowledged < self.wait_replicas:
            raise ReplicationError(
                f"batch {batch.sequence} of writer {batch.writer!r} reached "
                f"{acknowledged} of {self.wait_replicas} replicas within "
                f"{self.wait_timeout} s; keeping it to resend"
            )
        return ApplyResult(bool(applied), int(failed), not metadata_exists)

    def read(self, names: Sequence[str]) -> Snapshot:
        """Read metadata, heartbeats and the families ``names`` in one round trip.

        Runs in a thread. The number of commands depends only on ``len(names)``, never on
        the other keys in the database.

        :raises redis.RedisError: when Redis cannot be reached, or the metadata or
            heartbeat key cannot be read.
        """
        with self.client.pipeline(transaction=False) as pipe:
            pipe.hgetall(self.meta_key)
            pipe.hgetall(self.help_key)
            pipe.zrange(self.heartbeat_key, 0, -1, withscores=True)
            for name in names:
                pipe.hgetall(self.family_key(name))
            # A family key of the wrong type fails alone; the other replies stay usable.
            replies = pipe.execute(raise_on_error=False)
        for reply in replies[:3]:
            if isinstance(reply, Exception):
                raise reply

        snapshot = Snapshot()
        undecodable = snapshot.undecodable
        snapshot.schemas = _decode_hash(replies[0], undecodable, self.meta_key)
        snapshot.help = _decode_hash(replies[1], undecodable, self.help_key)
        for writer, score in replies[2]:
            snapshot.heartbeats[writer.decode("utf-8", "replace")] = float(score)
        for name, reply in zip(names, replies[3:], strict=True):
            if isinstance(reply, Exception):
                undecodable[name] = undecodable.get(name, 0) + 1
            elif reply:
                snapshot.families[name] = _decode_hash(reply, undecodable, name)
        return snapshot

    def prune(
        self,
        stale: Mapping[str, Sequence[tuple[str, str]]],
        cutoff: float,
        sequence_cutoff: float,
    ) -> int:
        """Remove stale writers and their gauge fields in one script call (runs in a thread).

        :raises redis.RedisError: when Redis cannot be reached.
        """
        keys = [self.heartbeat_key, self.sequence_key, self.sequence_seen_key]
        key_index: dict[str, int] = {}
        args: list[str | int] = [repr(float(cutoff)), repr(float(sequence_cutoff))]
        for writer, fields in stale.items():
            args += [writer, len(fields)]
            for name, gauge_field in fields:
                index = key_index.get(name)
                if index is None:
                    keys.append(self.family_key(name))
                    index = key_index[name] = len(keys)
                args += [index, gauge_field]
        return int(self._prune_script(keys=keys, args=args))


def _decode_hash(
    reply: Mapping[bytes, bytes], undecodable: dict[str, int], name: str
) -> dict[str, str]:
    decoded: dict[str, str] = {}
    for raw_field, raw_value in reply.items():
        try:
            decoded[raw_field.decode("utf-8")] = raw_value.decode("utf-8")
        except UnicodeDecodeError:
            undecodable[name] = undecodable.get(name, 0) + 1
    return decoded


class EmbeddedStore:
    """A :class:`MetricStore` in process memory, for a single proxy process without Redis.

    It has the same semantics as :class:`RedisStore` (sequence check, gauge fields,
    pruning) but nothing is shared between processes and everything is lost at exit.
    Methods take a lock, so they may run in any thread.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._schemas: dict[str, str] = {}
        self._help: dict[str, str] = {}
        self._families: dict[str, dict[str, str]] = {}
        self._heartbeats: dict[str, float] = {}
        self._sequences: dict[str, int] = {}
        self._sequence_seen: dict[str, float] = {}

    def register(self, definitions: Sequence[MetricDefinition]) -> None:
        """Store ``definitions``.

        :raises SchemaConflictError: when a stored schema differs; nothing is stored then.
        """
        with self._lock:
            for definition in definitions:
                stored = self._schemas.get(definition.name)
                if stored is not None and stored != definition.schema():
                    raise _conflict(definition.name, stored, definition.schema(), "memory")
            for definition in definitions:
                self._schemas[definition.name] = definition.schema()
                self._help[definition.name] = definition.help

    def apply(self, batch: Batch, now: float) -> ApplyResult:
        """Apply ``batch`` once and record the heartbeat at ``now`` (seconds)."""
        with self._lock:
            self._sequence_seen[batch.writer] = now
            if batch.retire:
                self._heartbeats.pop(batch.writer, None)
            else:
                self._heartbeats[batch.writer] = now
            if batch.sequence <= self._sequences.get(batch.writer, 0):
                return ApplyResult(False, 0, not self._schemas)

            failed = 0
            for operation, name, series_field, value in batch_operations(batch):
                family = self._families.setdefault(name, {})
                try:
                    if operation == "f":
                        total = float(family.get(series_field, "0")) + float(value)
                        family[series_field] = repr(total)
                    elif operation == "i":
                        family[series_field] = str(int(family.get(series_field, "0")) + int(value))
                    elif operation == "s":
                        family[series_field] = value
                    else:
                        family.pop(series_field, None)
                except ValueError:
                    failed += 1
            if batch.retire:
                # A retiring writer sends nothing after this batch.
                self._sequences.pop(batch.writer, None)
                self._sequence_seen.pop(batch.writer, None)
            else:
                self._sequences[batch.writer] = batch.sequence
            return ApplyResult(True, failed, not self._schemas)

    def read(self, names: Sequence[str]) -> Snapshot:
        """Return a copy of the metadata, heartbeats and families ``names``."""
        with self._lock:
            return Snapshot(
                schemas=dict(self._schemas),
                help=dict(self._help),
                families={
                    name: dict(self._families[name]) for name in names if self._families.get(name)
                },
                heartbeats=dict(self._heartbeats),
            )

    def prune(
        self,
        stale: Mapping[str, Sequence[tuple[str, str]]],
        cutoff: float,
        sequence_cutoff: float,
    ) -> int:
        """Remove stale writers and their gauge fields; see :meth:`MetricStore.prune`."""
        removed = 0
        with self._lock:
            for writer, fields in stale.items():
                seen = self._heartbeats.get(writer)
                if seen is not None and seen >= cutoff:
                    continue
                self._heartbeats.pop(writer, None)
                for name, gauge_field in fields:
                    self._families.get(name, {}).pop(gauge_field, None)
                removed += 1
            for writer, seen in list(self._sequence_seen.items()):
                if seen < sequence_cutoff:
                    del self._sequence_seen[writer]
                    self._sequences.pop(writer, None)
        return removed
