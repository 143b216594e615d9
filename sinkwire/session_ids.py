"""The one place that knows what a session id looks like: `<replica id>.<random hex>`.

The prefix names the replica that opened the session, so a gateway can route a Resume with no
shared state; everything else treats the id as an opaque string.
"""

from __future__ import annotations

import uuid

_SEPARATOR = "."


def new_session_id(replica_id: str) -> str:
    """A fresh, unguessable id for a session opened on `replica_id`."""
    if _SEPARATOR in replica_id:
        raise ValueError(f"a replica id may not contain {_SEPARATOR!r}: {replica_id!r}")
    return f"{replica_id}{_SEPARATOR}{uuid.uuid4().hex}"


def replica_of(session_id: str) -> str:
    """The id of the replica that opened the session ('' if the id has no replica prefix)."""
    replica_id, separator, _ = session_id.partition(_SEPARATOR)
    return replica_id if separator else ""
