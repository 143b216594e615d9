"""The one place that knows what a session id looks like: `<replica id>.<random hex>`.

The prefix names the replica that opened the session, so a gateway can route a Resume with no
shared state; everything else treats the id as an opaque string. Ids from clients are checked
against the format (`is_session_id`) before anything routes, stores or quotes them.
"""

from __future__ import annotations

import re
import uuid

_SEPARATOR = "."
MAX_REPLICA_ID_CHARS = 64
_REPLICA_ID = re.compile(rf"[A-Za-z0-9_-]{{1,{MAX_REPLICA_ID_CHARS}}}")
_SESSION_ID = re.compile(rf"[A-Za-z0-9_-]{{1,{MAX_REPLICA_ID_CHARS}}}\.[0-9a-f]{{32}}")


def new_session_id(replica_id: str) -> str:
    """A fresh, unguessable id for a session opened on `replica_id`."""
    if not _REPLICA_ID.fullmatch(replica_id):
        raise ValueError(
            f"a replica id is 1..{MAX_REPLICA_ID_CHARS} letters, digits, '_' or '-': {replica_id!r}"
        )
    return f"{replica_id}{_SEPARATOR}{uuid.uuid4().hex}"


def is_session_id(session_id: str) -> bool:
    """Whether `session_id` has the form of an id `new_session_id` makes."""
    return _SESSION_ID.fullmatch(session_id) is not None


def replica_of(session_id: str) -> str:
    """The id of the replica that opened the session ('' if the id has no replica prefix)."""
    replica_id, separator, _ = session_id.partition(_SEPARATOR)
    return replica_id if separator else ""
