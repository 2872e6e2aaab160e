"""A throw-away PostgreSQL server from Debian's packages, for tests and benchmarks.

The PostgreSQL call log (:mod:`opkeeper.gateway.calllog_postgres`) is tested and
measured against the real server, never a mock (``make clients`` installs
Debian's ``postgresql``). It runs in a private temporary directory and listens
only on a Unix socket there (no TCP port to collide on). initdb and postgres
refuse to run as root, which CI is: then the server runs as ``nobody``, in a
directory handed to it. Each user gets a database of its own
(:meth:`Server.new_database`); :meth:`Server.restart` is for fault tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import glob
import os
import pathlib
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from typing import Any

import asyncpg

USER = "opkeeper"
"""The superuser initdb makes (trust auth: the socket is in a private directory)."""
PORT = 5432
"""Only names the socket file (``.s.PGSQL.5432``); there is no TCP listener."""
START_TIMEOUT_SECONDS = 30.0
"""How long a (re)start may take until the server accepts connections."""
STOP_TIMEOUT_SECONDS = 30.0
"""How long a shutdown may take."""


class Missing(RuntimeError):
    """PostgreSQL's server binaries are not installed."""


def binaries() -> pathlib.Path:
    """The newest installed server's bin directory (``/usr/lib/postgresql/<ver>/bin``)."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/postgres"),
        key=lambda p: int(pathlib.Path(p).parent.parent.name.split(".")[0]),
    )
    if not found:
        raise Missing(
            "PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin:"
            " run `make clients` (installs Debian's postgresql package)"
        )
    return pathlib.Path(found[-1]).parent


@dataclasses.dataclass(kw_only=True)
class Server:
    """One server; :meth:`dsn` names a database on it."""

    bin_dir: pathlib.Path
    root: pathlib.Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def data(self) -> pathlib.Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> pathlib.Path:
        return self.root / "run"

    @property
    def log_path(self) -> pathlib.Path:
        return self.root / "postgres.log"

    def _as_owner(self) -> dict[str, Any]:
        """Popen arguments that drop root to ``nobody`` (none when not root)."""
        if os.geteuid() != 0:
            return {}
        nobody = pwd.getpwnam("nobody")
        return {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}

    def init(self) -> None:
        """Make the data directory (``initdb``)."""
        self.socket_dir.mkdir()
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            for path in (self.root, self.socket_dir):
                os.chown(path, nobody.pw_uid, nobody.pw_gid)
        initdb = [str(self.bin_dir / "initdb"), "-D", str(self.data), "-U", USER]
        initdb += ["--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync"]
        subprocess.run(initdb, check=True, capture_output=True, cwd=self.root, **self._as_owner())

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        assert self.process is None
        command = [str(self.bin_dir / "postgres"), "-D", str(self.data)]
        command += ["-k", str(self.socket_dir), "-p", str(PORT), "-c", "listen_addresses="]
        # Speed: fsync off loses data only if the machine itself crashes, which no test
        # or benchmark does (a killed server's writes are in the OS's page cache).
        command += ["-c", "fsync=off", "-c", "full_page_writes=off"]
        command += ["-c", "max_connections=200"]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, cwd=self.root, **self._as_owner()
            )
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not self._ready():
            if time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL did not start: see {self.log_path}")
            time.sleep(0.05)  # polling pg_isready: the server offers nothing to wait on

    def _ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"postgres exited with {self.process.returncode}:\n{tail}")
        probe = [str(self.bin_dir / "pg_isready"), "-q", "-h", str(self.socket_dir)]
        probe += ["-p", str(PORT), "-U", USER, "-d", "postgres"]
        return subprocess.run(probe, check=False).returncode == 0

    def stop(self, *, mode: str = "fast") -> None:
        """``fast``: SIGINT (sessions cut, clean shutdown); ``immediate``: SIGQUIT (like a
        crash: recovery at the next start)."""
        if self.process is None:
            return
        self.process.send_signal(signal.SIGINT if mode == "fast" else signal.SIGQUIT)
        self.process.wait(timeout=STOP_TIMEOUT_SECONDS)
        self.process = None

    def pids(self) -> list[int]:
        """The postmaster and its children (backends, writer, checkpointer, ...)."""
        if self.process is None:
            return []
        found = [self.process.pid]
        for entry in pathlib.Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue  # ended meanwhile
            # The command name (field 2) may hold spaces: count fields after its ")".
            if int(stat.rsplit(")", 1)[1].split()[1]) == self.process.pid:
                found.append(int(entry.name))
        return found

    def restart(self, *, mode: str = "fast") -> None:
        self.stop(mode=mode)
        self.start()

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}@/{database}?host={self.socket_dir}&port={PORT}"

    def new_database(self) -> str:
        """A fresh empty database; returns its DSN."""
        name = f"t_{uuid.uuid4().hex[:16]}"

        async def create() -> None:
            conn = await asyncpg.connect(self.dsn())
            try:
                await conn.execute(f'CREATE DATABASE "{name}"')
            finally:
                await conn.close()

        asyncio.run(create())
        return self.dsn(name)


@contextlib.contextmanager
def started(*, bin_dir: pathlib.Path | None = None) -> Iterator[Server]:
    """A server (from ``bin_dir``, default :func:`binaries`) in a fresh temporary
    directory, stopped and removed afterwards."""
    bin_dir = bin_dir or binaries()
    root = pathlib.Path(tempfile.mkdtemp(prefix="opkeeper-pg-"))
    server = Server(bin_dir=bin_dir, root=root)
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
