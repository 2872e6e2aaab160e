"""A real PostgreSQL server for the tests, from Debian's packages (``make clients``).

Started once per session in a private temporary directory, listening only on
a Unix socket there (no TCP port to collide on). initdb and postgres refuse
to run as root, which CI is: then the server runs as ``nobody`` in a directory
given to it. Each test gets its own database, so tests never see each other's
serials. The server can be restarted (fast or immediate) for the fault tests.
"""

from __future__ import annotations

import asyncio
import dataclasses
import glob
import os
import pathlib
import pwd
import shutil
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest

from tests.helpers import wait_for

USER = "opkeeper"
"""The database superuser initdb makes (trust auth: the socket is in a private dir)."""
PORT = 5432
"""Only names the socket file (``.s.PGSQL.5432``); no TCP listener."""
START_TIMEOUT = 30.0
"""Seconds the server may take to accept connections after a (re)start."""


def binaries() -> pathlib.Path:
    """The newest installed server's bin directory; fails the test run clearly if none."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/postgres"),
        key=lambda p: int(pathlib.Path(p).parent.parent.name.split(".")[0]),
    )
    if not found:
        pytest.fail(
            "PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin:"
            " run `make clients` (installs Debian's postgresql package)",
            pytrace=False,
        )
    return pathlib.Path(found[-1]).parent


@dataclasses.dataclass(kw_only=True)
class PostgresServer:
    """One running server; ``dsn()`` for a database, ``restart()`` for fault tests."""

    bin_dir: pathlib.Path
    root: pathlib.Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def data(self) -> pathlib.Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> pathlib.Path:
        return self.root / "run"

    def _as_owner(self) -> dict[str, Any]:
        """Popen arguments that drop root to ``nobody`` (no-op when not root)."""
        if os.geteuid() != 0:
            return {}
        nobody = pwd.getpwnam("nobody")
        return {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}

    def init(self) -> None:
        self.socket_dir.mkdir()
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            for path in (self.root, self.socket_dir):
                os.chown(path, nobody.pw_uid, nobody.pw_gid)
        subprocess.run(
            [
                str(self.bin_dir / "initdb"),
                "-D",
                str(self.data),
                "-U",
                USER,
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
                "--locale=C",
            ],
            check=True,
            capture_output=True,
            cwd=self.root,
            **self._as_owner(),
        )

    def start(self) -> None:
        assert self.process is None
        log = open(self.root / "postgres.log", "ab")  # noqa: SIM115 - the child owns it
        try:
            self.process = subprocess.Popen(
                [
                    str(self.bin_dir / "postgres"),
                    "-D",
                    str(self.data),
                    "-k",
                    str(self.socket_dir),
                    "-p",
                    str(PORT),
                    "-c",
                    "listen_addresses=",
                    # Test speed: a crash of the server process loses nothing the OS
                    # has (the tests never crash the machine).
                    "-c",
                    "fsync=off",
                    "-c",
                    "full_page_writes=off",
                    "-c",
                    "max_connections=200",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.root,
                **self._as_owner(),
            )
        finally:
            log.close()
        wait_for(self._ready, timeout=START_TIMEOUT, what="PostgreSQL accepting connections")

    def _ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            log = (self.root / "postgres.log").read_text(errors="replace")[-2000:]
            raise AssertionError(f"postgres exited with {self.process.returncode}:\n{log}")
        probe = [str(self.bin_dir / "pg_isready"), "-q", "-h", str(self.socket_dir)]
        probe += ["-p", str(PORT), "-U", USER, "-d", "postgres"]
        return subprocess.run(probe, check=False).returncode == 0

    def stop(self, *, mode: str = "fast") -> None:
        """``fast``: SIGINT (sessions cut, clean shutdown); ``immediate``: SIGQUIT (as a
        crash: recovery at the next start)."""
        if self.process is None:
            return
        self.process.send_signal(signal.SIGINT if mode == "fast" else signal.SIGQUIT)
        self.process.wait(timeout=START_TIMEOUT)
        self.process = None

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


def running_server() -> Iterator[PostgresServer]:
    """Start a server in a fresh temporary directory; stop and remove it after."""
    root = pathlib.Path(tempfile.mkdtemp(prefix="opkeeper-pg-"))
    server = PostgresServer(bin_dir=binaries(), root=root)
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
