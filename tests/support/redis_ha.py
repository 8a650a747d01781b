"""Redis Sentinel and Redis Cluster deployments for integration tests, on loopback ports.

Each node is a ``RedisServer`` on its own copy of the repository's ``redis.conf``. A Sentinel
deployment is one primary, one replica and one Sentinel; a cluster is three primaries
without replicas, created with ``redis-cli --cluster create``.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

import redis

from tests.support.servers import (
    REPO_ROOT,
    START_TIMEOUT,
    RedisServer,
    free_port,
    require_binary,
    terminate,
    wait_for_port,
)

SERVICE = "mymaster"


class _NodeServer(RedisServer):
    """A RedisServer that runs on its own copy of ``redis.conf``.

    Sentinel sends CONFIG REWRITE to the nodes it reconfigures, which writes
    ``replicaof`` into the configuration file; the repository's file must stay untouched.
    """

    def __init__(self, tmp_path: Path, port: int | None = None, appendonly: bool = True,
                 extra_args: Iterable[str] = ()) -> None:
        super().__init__(tmp_path, port=port, appendonly=appendonly, extra_args=extra_args)
        self.config_path = self.dir / "redis.conf"
        shutil.copy(REPO_ROOT / "redis.conf", self.config_path)

    def argv(self) -> list[str]:
        argv = super().argv()
        return [str(self.config_path) if arg == str(REPO_ROOT / "redis.conf") else arg
                for arg in argv]


def _wait(condition: object, what: str, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if condition():  # type: ignore[operator]
                return
        except redis.RedisError as err:
            last_error = err
        time.sleep(0.1)
    raise RuntimeError(f"timed out after {timeout} s waiting for {what}; last error: {last_error}")


class SentinelDeployment:
    """A primary, a replica of it, and one Sentinel that monitors them as ``mymaster``."""

    def __init__(self, tmp_path: Path) -> None:
        self.dir = Path(tmp_path) / "sentinel"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.primary = _NodeServer(self.dir)
        self.replica = _NodeServer(
            self.dir, extra_args=["--replicaof", "127.0.0.1", str(self.primary.port)]
        )
        self.sentinel_port = free_port()
        self.sentinel_process: subprocess.Popen[bytes] | None = None
        self.sentinel_log = self.dir / "sentinel.log"

    @property
    def url(self) -> str:
        """The store URL: ``redis+sentinel://127.0.0.1:PORT/mymaster/0``."""
        return f"redis+sentinel://127.0.0.1:{self.sentinel_port}/{SERVICE}/0"

    def sentinel_client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.sentinel_port, socket_timeout=5)

    def start(self) -> SentinelDeployment:
        self.primary.start()
        self.replica.start()
        _wait(self._replica_in_sync, "the replica to sync with the primary")

        config = self.dir / "sentinel.conf"
        config.write_text(
            "\n".join(
                [
                    f"port {self.sentinel_port}",
                    "bind 127.0.0.1",
                    "daemonize no",
                    f'dir "{self.dir}"',
                    f'logfile "{self.sentinel_log}"',
                    f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary.port} 1",
                    f"sentinel down-after-milliseconds {SERVICE} 2000",
                    f"sentinel failover-timeout {SERVICE} 10000",
                    f"sentinel parallel-syncs {SERVICE} 1",
                ]
            )
            + "\n"
        )
        binary = require_binary("redis-server")
        self.sentinel_process = subprocess.Popen(
            [binary, str(config), "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        wait_for_port(self.sentinel_port, process=self.sentinel_process,
                      log_path=self.sentinel_log)
        _wait(self._replica_known, "the Sentinel to discover the replica")
        return self

    def _replica_in_sync(self) -> bool:
        info = self.replica.client().info("replication")
        return bool(info.get("master_link_status") == "up")

    def _replica_known(self) -> bool:
        replicas = self.sentinel_client().sentinel_slaves(SERVICE)
        # SENTINEL FAILOVER returns NOGOODSLAVE until the Sentinel has read the replica's
        # own INFO, which shows as a known master link status.
        return any(
            int(replica["port"]) == self.replica.port
            and "s_down" not in replica["flags"]
            and replica.get("master-link-status") == "ok"
            for replica in replicas
        )

    def primary_port(self) -> int:
        """Return the port the Sentinel names as the primary now."""
        host, port = self.sentinel_client().sentinel_get_master_addr_by_name(SERVICE)
        return int(port)

    def failover(self) -> int:
        """Run ``SENTINEL FAILOVER`` and wait until the old primary replicates the new one.

        :return: the port of the new primary.
        """
        old = self.primary_port()
        self.sentinel_client().execute_command("SENTINEL", "FAILOVER", SERVICE)
        _wait(lambda: self.primary_port() != old, "the Sentinel to promote the replica")
        new = self.primary_port()
        demoted = self.primary if old == self.primary.port else self.replica
        _wait(
            lambda: demoted.client().info("replication").get("master_link_status") == "up",
            "the old primary to replicate the new one",
        )
        return new

    def stop(self) -> None:
        if self.sentinel_process is not None:
            terminate(self.sentinel_process)
        self.replica.stop()
        self.primary.stop()


class ClusterDeployment:
    """Three cluster primaries on loopback ports, with every slot assigned."""

    def __init__(self, tmp_path: Path, size: int = 3) -> None:
        self.dir = Path(tmp_path) / "cluster"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.nodes = []
        for _ in range(size):
            port = free_port()
            self.nodes.append(
                _NodeServer(
                    self.dir,
                    port=port,
                    appendonly=False,
                    extra_args=[
                        "--cluster-enabled", "yes",
                        "--cluster-config-file", str(self.dir / f"nodes-{port}.conf"),
                        "--cluster-node-timeout", "5000",
                        # The default bus port, port + 10000, fails for ports above 55535.
                        "--cluster-port", str(free_port()),
                    ],
                )
            )

    @property
    def url(self) -> str:
        """The store URL: ``redis+cluster://`` with every node."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)

    def start(self) -> ClusterDeployment:
        for node in self.nodes:
            node.start()
        cli = require_binary("redis-cli")
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        result = subprocess.run(
            [cli, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True,
            timeout=60,
        )
        if result.returncode != 0:
            raise RuntimeError(
                "redis-cli --cluster create failed: "
                + (result.stdout + result.stderr).decode("utf-8", "replace")
            )
        _wait(self._ready, "every cluster node to report cluster_state:ok")
        return self

    def _ready(self) -> bool:
        for node in self.nodes:
            info = node.client().execute_command("CLUSTER", "INFO").decode()
            if "cluster_state:ok" not in info:
                return False
        return True

    def node_for_slot(self, slot: int) -> RedisServer:
        """Return the node that serves ``slot``."""
        for start, end, primary, *_ in self.nodes[0].client().execute_command("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                port = int(primary[1])
                return next(node for node in self.nodes if node.port == port)
        raise LookupError(f"no node serves slot {slot}")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
