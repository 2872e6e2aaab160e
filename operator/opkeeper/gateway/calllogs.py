"""Which call log store a ``--call-log`` value names, opened and ready.

A ``postgresql://`` (or ``postgres://``) URL is the shared PostgreSQL store
(:mod:`.calllog_postgres`, several replicas); anything else is the path of the
embedded SQLite file (:mod:`.calllog_sqlite`, the default). Kept apart from
:mod:`.calllog` so that the interface does not import its implementations.
"""

from __future__ import annotations

import urllib.parse

from opkeeper.gateway import calllog, calllog_postgres, calllog_sqlite

ENV = "OPKEEPER_CALL_LOG"
"""Environment variable ``opkeeper gateway`` takes ``--call-log`` from when the option
is not given: how a DSN with a password comes from a Secret (the chart does this)."""


def is_postgres(location: str) -> bool:
    """Whether ``location`` names a PostgreSQL database rather than a SQLite file."""
    return urllib.parse.urlsplit(location).scheme.lower() in calllog_postgres.SCHEMES


def shown(location: str) -> str:
    """``location`` as it may be logged (a DSN's password replaced by ``***``)."""
    return calllog_postgres.shown(location) if is_postgres(location) else location


async def open_store(*, location: str) -> calllog.CallLog:
    """The store ``location`` names, opened (schema created if needed)."""
    if is_postgres(location):
        postgres = calllog_postgres.PostgresCallLog(
            settings=calllog_postgres.PostgresSettings(dsn=location)
        )
        await postgres.open()
        return postgres
    sqlite = calllog_sqlite.SqliteCallLog(settings=calllog_sqlite.SqliteSettings(path=location))
    await sqlite.open()
    return sqlite
