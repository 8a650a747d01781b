"""Servers the benchmarks start: redis-server, nginx and Python processes.

Every server listens on 127.0.0.1 on a free port and is stopped by its process id, with
SIGTERM first and SIGKILL after a grace period. :class:`Processes` stops everything it
started, also when a benchmark fails halfway.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import redis

__all__ = [
    "REPO_ROOT",
    "MissingProgramError",
    "Process",
    "Processes",
    "cpu_seconds",
    "free_port",
    "peak_rss_kib",
    "require_programs",
    "wait_for_port",
]

REPO_ROOT = Path(__file__).resolve().parents[1]

START_TIMEOUT = 30.0  # seconds a server may take to listen
STOP_TIMEOUT = 10.0  # seconds between SIGTERM and SIGKILL

# How to install each program the benchmarks need, on Debian or Ubuntu.
INSTALL_HINTS = {
    "redis-server": "apt-get install -y redis-server",
    "nginx": "apt-get install -y nginx",
    "wrk": "apt-get install -y wrk",
    "curl": "apt-get install -y curl",
}


class MissingProgramError(RuntimeError):
    """A program the benchmarks need is not on PATH."""


def require_programs(names: Sequence[str]) -> None:
    """Raise :class:`MissingProgramError` naming every missing program and its install line."""
    missing = [name for name in names if shutil.which(name) is None]
    if missing:
        packages = " ".join(INSTALL_HINTS.get(name, name).split()[-1] for name in missing)
        raise MissingProgramError(
            f"required programs not found on PATH: {', '.join(missing)}; install them with "
            f"`sudo apt-get install -y {packages}` (Debian or Ubuntu) and run the command again"
        )


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[bytes], log_path: Path) -> None:
    """Wait until ``process`` listens on 127.0.0.1:``port``.

    Another program may take the port between :func:`free_port` and the start and accept
    connections on it, so the listening socket must belong to ``process``.

    :raises RuntimeError: when the process exits first, when the port belongs to another
        process, or when the port stays closed for ``START_TIMEOUT`` seconds. The message
        ends with the process's log.
    """
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"{process.args!r} exited with status {process.returncode} before listening "
                f"on 127.0.0.1:{port}{_log_tail(log_path)}"
            )
        owner = _listener_owned_by(port, process.pid)
        if owner is True:
            return
        if owner is None:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return
            except OSError:
                pass
        time.sleep(0.05)
    raise RuntimeError(
        f"process {process.pid} did not listen on 127.0.0.1:{port} after {START_TIMEOUT} s;"
        f" another program may hold the port{_log_tail(log_path)}"
    )


def _listener_owned_by(port: int, pid: int) -> bool | None:
    """Return whether ``pid`` owns the socket listening on 127.0.0.1:``port``.

    False also when nothing listens yet; None when ``/proc`` cannot tell.
    """
    try:
        table = Path("/proc/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return None
    address = f"0100007F:{port:04X}"
    inodes = {
        fields[9]
        for fields in (line.split() for line in table)
        if fields[1] == address and fields[3] == "0A"  # 0A is TCP_LISTEN
    }
    if not inodes:
        return False
    try:
        descriptors = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return None
    for descriptor in descriptors:
        try:
            target = os.readlink(descriptor)
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            return True
    return False


def _log_tail(log_path: Path, lines: int = 30) -> str:
    if not log_path.exists():
        return ""
    text = log_path.read_text(errors="replace").splitlines()[-lines:]
    return f"\nlast lines of {log_path}:\n" + "\n".join(text)


def cpu_seconds(pid: int) -> float:
    """Return the user plus system CPU time that process ``pid`` has used, in seconds.

    The time covers every thread of the process; its resolution is one clock tick
    (usually 10 ms).
    """
    text = Path(f"/proc/{pid}/stat").read_text()
    # The command name in parentheses may contain spaces, so fields count from its end.
    fields = text[text.rindex(")") + 2 :].split()
    ticks = int(fields[11]) + int(fields[12])  # utime and stime, fields 14 and 15 of stat
    return ticks / os.sysconf("SC_CLK_TCK")


def peak_rss_kib(pid: int) -> int:
    """Return the peak resident set size (VmHWM) of process ``pid`` in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/status has no VmHWM line")


class Process:
    """One started server process, stopped by its pid.

    :ivar port: the port it listens on, or None.
    :ivar log_path: where its stdout and stderr go.
    """

    def __init__(
        self,
        argv: Sequence[str],
        log_path: Path,
        port: int | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        self.port = port
        with log_path.open("wb") as log:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=cwd,
            )
        if port is not None:
            try:
                wait_for_port(port, self.popen, log_path)
            except RuntimeError:
                self.stop()
                raise

    @property
    def pid(self) -> int:
        """The process id."""
        return self.popen.pid

    def stop(self) -> None:
        """Send SIGTERM to the pid, and SIGKILL when it has not exited after a grace period."""
        if self.popen.poll() is not None:
            return
        os.kill(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.kill(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout=STOP_TIMEOUT)


class Processes:
    """The servers one benchmark started; :meth:`stop_all` stops them newest first.

    :param directory: where configuration files, data and logs go.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._started: list[Process] = []

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop_all()

    def start(
        self,
        name: str,
        argv: Sequence[str],
        port: int | None = None,
        env: Mapping[str, str] | None = None,
    ) -> Process:
        """Start ``argv`` with its output in ``<directory>/<name>.log``; wait for ``port``."""
        process = Process(argv, self.directory / f"{name}.log", port, env, self.directory)
        self._started.append(process)
        return process

    def stop(self, process: Process) -> None:
        """Stop one process this object started."""
        process.stop()
        if process in self._started:
            self._started.remove(process)

    def stop_all(self) -> None:
        """Stop every process still running, newest first."""
        while self._started:
            self._started.pop().stop()

    def redis(self, config: Path, name: str = "redis") -> tuple[Process, redis.Redis]:
        """Start redis-server from a copy of ``config``; return it and a client.

        Port, bind address, data directory and logging are overridden; the rest (for the
        repository's ``redis.conf``: append only file with ``appendfsync everysec``) is
        the configuration under test. The copy keeps ``config`` itself unchanged when a
        ``CONFIG REWRITE`` reaches the server.

        :raises RuntimeError: when the server starts as a replica, whose writes fail.
        """
        port = free_port()
        data = self.directory / f"{name}-data"
        data.mkdir(parents=True, exist_ok=True)
        copy = data / "redis.conf"
        shutil.copyfile(config, copy)
        argv = [
            "redis-server", str(copy),
            "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data),
            "--daemonize", "no", "--logfile", "", "--save", "",
        ]
        process = self.start(name, argv, port)
        client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=30)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                role = client.info("replication")["role"]
                break
            except redis.BusyLoadingError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        if role != "master":
            raise RuntimeError(
                f"redis-server started from {config} runs as a {role}, so writes fail; "
                f"remove the replicaof line from {config} or pass --redis-conf with a file "
                "that has none"
            )
        return process, client

    def nginx(self, name: str, server_blocks: str, worker_processes: int = 1) -> Process:
        """Start nginx in the foreground with ``server_blocks`` in its ``http`` block.

        nginx runs with its own prefix directory and configuration, never the system
        service; every ``listen`` in ``server_blocks`` must name 127.0.0.1.
        """
        prefix = self.directory / name
        (prefix / "logs").mkdir(parents=True, exist_ok=True)
        config = prefix / "nginx.conf"
        # Started as root, nginx would run its workers as "nobody", who cannot read the
        # scratch directory or the object files. The workers run as the invoking user.
        user = f"user {pwd.getpwuid(os.geteuid()).pw_name};" if os.geteuid() == 0 else ""
        config.write_text(
            f"""
{user}
worker_processes {worker_processes};
daemon off;
master_process on;
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    default_type application/octet-stream;
{server_blocks}
}}
"""
        )
        # nginx reports a bad configuration on stderr and exits; the log keeps it.
        ports = [int(port) for port in _listen_ports(server_blocks)]
        process = self.start(name, ["nginx", "-p", str(prefix), "-c", str(config)])
        for port in ports:
            wait_for_port(port, process.popen, process.log_path)
        return process

    def python(
        self, name: str, args: Sequence[str], port: int | None = None,
        env: Mapping[str, str] | None = None,
    ) -> Process:
        """Start ``python args`` with this repository first on ``PYTHONPATH``."""
        full_env = dict(os.environ if env is None else env)
        path = [str(REPO_ROOT)]
        if full_env.get("PYTHONPATH"):
            path.append(full_env["PYTHONPATH"])
        full_env["PYTHONPATH"] = os.pathsep.join(path)
        return self.start(name, [sys.executable, *args], port, full_env)


def _listen_ports(server_blocks: str) -> list[str]:
    ports = []
    for line in server_blocks.splitlines():
        words = line.strip().rstrip(";").split()
        if words[:1] == ["listen"] and len(words) > 1:
            if not words[1].startswith("127.0.0.1:"):
                raise ValueError(f"nginx listen {words[1]!r} is not on 127.0.0.1")
            ports.append(words[1].rpartition(":")[2])
    return ports
