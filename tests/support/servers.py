"""Real servers for integration tests: redis-server, moto's S3 server and twistd processes.

Every server listens on 127.0.0.1 on a free port and is stopped by the fixture that started it.
A missing binary fails the test instead of skipping it, because CI installs every component
and a silently skipped test proves nothing.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

# Generous because CI runs on 2 cores next to other test processes.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def require_binary(name: str) -> str:
    """Return the path of executable ``name``, or fail the test when it is not installed."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"required program {name!r} was not found on PATH; install it "
            f"(the README's test command installs redis-server and prometheus with apt-get)"
        )
    return path


def wait_for_port(port: int, timeout: float = START_TIMEOUT,
                  process: subprocess.Popen | None = None,
                  log_path: Path | None = None) -> None:
    """Wait until something accepts TCP connections on 127.0.0.1:``port``.

    :raises RuntimeError: the process exited first, or the port stayed closed for ``timeout``
        seconds; the message includes the end of ``log_path``.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(
                f"process {process.args!r} exited with {process.returncode} before listening "
                f"on port {port}{log_tail(log_path)}"
            )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(
        f"nothing listened on 127.0.0.1:{port} after {timeout} s{log_tail(log_path)}"
    )


def log_tail(log_path: Path | None, lines: int = 40) -> str:
    if log_path is None or not log_path.exists():
        return ""
    text = log_path.read_text(errors="replace").splitlines()[-lines:]
    return "\nlast lines of " + str(log_path) + ":\n" + "\n".join(text)


def terminate(process: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=STOP_TIMEOUT)


class RedisServer:
    """A redis-server configured from the repository's ``redis.conf``.

    Port, data directory, log file and daemonizing are overridden on the command line, so the
    rest of ``redis.conf`` (AOF, eviction policy, protected mode) is what the tests exercise.
    """

    def __init__(self, tmp_path: Path, port: int | None = None, appendonly: bool = True,
                 extra_args: Iterable[str] = ()) -> None:
        self.binary = require_binary("redis-server")
        self.port = port or free_port()
        self.dir = Path(tmp_path) / f"redis-{self.port}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.dir / "redis.log"
        self.appendonly = appendonly
        self.extra_args = list(extra_args)
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        assert self.process is not None, "redis-server is not running"
        return self.process.pid

    def argv(self) -> list[str]:
        # A copy, because CONFIG REWRITE (run by Sentinel and by some tests) rewrites the file
        # redis-server was started with.
        config = self.dir / "redis.conf"
        if not config.exists():
            shutil.copy(REPO_ROOT / "redis.conf", config)
        argv = [self.binary, str(config)]
        argv += [
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.dir),
            "--daemonize", "no",
            "--logfile", str(self.log_path),
            "--appendonly", "yes" if self.appendonly else "no",
            "--save", "",
        ]
        return argv + self.extra_args

    def start(self) -> RedisServer:
        self.process = subprocess.Popen(self.argv(), stdout=subprocess.DEVNULL,
                                        stderr=subprocess.STDOUT)
        wait_for_port(self.port, process=self.process, log_path=self.log_path)
        # Redis accepts connections before it has loaded the AOF, and PING fails with LOADING
        # until then.
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                self.client().ping()
                return self
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        """Stop with SIGTERM: Redis finishes writing its AOF first."""
        if self.process is not None:
            terminate(self.process)

    def kill(self) -> None:
        """Stop with SIGKILL, as a crash would."""
        if self.process is not None:
            terminate(self.process, signal.SIGKILL)

    def restart(self) -> None:
        """Stop and start again on the same port and data directory."""
        self.stop()
        self.start()

    def client(self, **kwargs: object):  # -> redis.Redis
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, **kwargs)


class MotoServer:
    """moto's S3 server (``moto.server``) in its own process.

    moto accepts any signature at all, so tests of forwarding put the SigV4-verifying front of
    ``tests.support.sigv4_front`` before it.
    """

    def __init__(self, port: int | None = None, log_dir: Path | None = None) -> None:
        self.port = port or free_port()
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="moto-"))
        self.log_path = self.log_dir / f"moto-{self.port}.log"
        self.process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MotoServer:
        env = dict(os.environ)
        # Keeps moto from reaching for real AWS credentials or regions of the host.
        env.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                   AWS_DEFAULT_REGION="us-east-1")
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, env=env,
            )
        wait_for_port(self.port, process=self.process, log_path=self.log_path)
        return self

    def stop(self) -> None:
        if self.process is not None:
            terminate(self.process)


def twistd_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Return an environment in which ``twistd`` finds this checkout's plugins and packages.

    twistd looks for plugins only in ``twisted/plugins`` folders on ``sys.path``, and this
    repository keeps them in ``twisted_plugins/`` (installed as ``twisted.plugins`` by
    ``pip install .``). The environment puts a temporary tree holding copies of those files,
    and the repository root, first on ``PYTHONPATH``, so the tests run the source they sit
    next to and never a stale installed copy.
    """
    plugin_root = Path(tempfile.mkdtemp(prefix="s3proxy-plugins-"))
    plugin_dir = plugin_root / "twisted" / "plugins"
    plugin_dir.mkdir(parents=True)
    for source in (REPO_ROOT / "twisted_plugins").glob("*.py"):
        if source.name != "__init__.py":
            shutil.copy(source, plugin_dir / source.name)
    env = dict(os.environ)
    path = [str(REPO_ROOT), str(plugin_root)]
    if env.get("PYTHONPATH"):
        path.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(path)
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env


def twistd_argv(plugin: str, *args: str, log_path: Path | None = None,
                pid_path: Path | None = None) -> list[str]:
    """Return the command line that runs ``twistd -n <plugin> <args>`` in the foreground.

    ``python -m twisted`` would start the newer ``twist`` runner, which has other options, so
    the command calls twistd's entry point through this interpreter.
    """
    argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "--nodaemon"]
    argv += ["--pidfile", str(pid_path) if pid_path else ""]
    if log_path is not None:
        argv += ["--logfile", str(log_path)]
    return argv + [plugin, *args]


class TwistdProcess:
    """A ``twistd`` process started from ``argv`` and ready once ``ready_url`` responds."""

    def __init__(self, argv: list[str], env: Mapping[str, str], ready_url: str | None = None,
                 ready_port: int | None = None, log_path: Path | None = None,
                 cwd: Path | None = None) -> None:
        self.argv = argv
        self.env = dict(env)
        self.ready_url = ready_url
        self.ready_port = ready_port
        self.log_path = log_path or Path(tempfile.mkdtemp(prefix="twistd-")) / "twistd.log"
        self.cwd = cwd or self.log_path.parent
        self.process: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None, "twistd is not running"
        return self.process.pid

    def start(self) -> TwistdProcess:
        stdout = open(self.log_path.with_suffix(".out"), "wb")  # noqa: SIM115 (kept open)
        self.process = subprocess.Popen(self.argv, env=self.env, cwd=self.cwd,
                                        stdout=stdout, stderr=subprocess.STDOUT)
        if self.ready_port is not None:
            wait_for_port(self.ready_port, process=self.process, log_path=self.log_path)
        if self.ready_url is not None:
            self._wait_for_url(self.ready_url)
        return self

    def _wait_for_url(self, url: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"twistd exited with {self.process.returncode} before {url} answered"
                    f"{log_tail(self.log_path)}{log_tail(self.log_path.with_suffix('.out'))}"
                )
            try:
                with urllib.request.urlopen(url, timeout=2):
                    return
            except urllib.error.HTTPError:
                return  # Any HTTP response means it listens.
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(
            f"{url} did not answer after {START_TIMEOUT} s{log_tail(self.log_path)}"
        )

    def stop(self) -> int | None:
        """Send SIGTERM, wait for the exit, and return the exit code."""
        if self.process is None:
            return None
        terminate(self.process)
        return self.process.returncode

    def kill(self) -> None:
        if self.process is not None:
            terminate(self.process, signal.SIGKILL)

    def log_text(self) -> str:
        parts = [p.read_text(errors="replace") for p in
                 (self.log_path, self.log_path.with_suffix(".out")) if p.exists()]
        return "\n".join(parts)
