"""Which database errors are worth retrying."""

from __future__ import annotations

import sqlalchemy as sa


def is_transient(exc: BaseException) -> bool:
    """Connection trouble, a locked or restarting database: retry with backoff. Anything else
    (data the database refuses, a constraint, a bug) fails the same way every time."""
    if isinstance(exc, sa.exc.DBAPIError):
        return exc.connection_invalidated or isinstance(
            exc, sa.exc.OperationalError | sa.exc.InterfaceError
        )
    return isinstance(exc, sa.exc.DisconnectionError | sa.exc.TimeoutError | OSError)
