"""Resume tokens: an HMAC of the session id (and of the API key name that owns it) under the
application's secret.

Stateless, so any replica (and a rebuilt one, after failover) can check a token, and ownership
survives with no shared state: a token is only valid for the key that opened the session. Without
API keys the owner is "" and the token is the HMAC of the session id alone. The secret is shared by
the whole application through AppSettings.resume_secret (deployments/secrets.py).
"""

from __future__ import annotations

import base64
import hashlib
import hmac

import grpc

from sinkwire.status import StreamError


def resume_token(secret: str, session_id: str, owner: str = "") -> str:
    message = session_id if not owner else f"{session_id}\x00{owner}"
    digest = hmac.new(secret.encode(), message.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest[:24]).decode()


def token_matches(secret: str, session_id: str, token: str, owner: str = "") -> bool:
    return hmac.compare_digest(resume_token(secret, session_id, owner).encode(), token.encode())


def check_resume(
    secret: str, session_id: str, token: str, owner: str, known_owner: str | None
) -> None:
    """Raise PERMISSION_DENIED unless `token` lets `owner` resume the session. `known_owner` (the
    key that opened it, when this replica knows) only picks the message."""
    if token_matches(secret, session_id, token, owner):
        return
    if (
        known_owner is not None
        and known_owner != owner
        and token_matches(secret, session_id, token, known_owner)
    ):
        raise StreamError(
            grpc.StatusCode.PERMISSION_DENIED, "this session belongs to another API key"
        )
    raise StreamError(grpc.StatusCode.PERMISSION_DENIED, "wrong resume token")
