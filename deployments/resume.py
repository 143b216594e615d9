"""Resume tokens: an HMAC of the session id under the application's secret.

Stateless, so any replica (and a rebuilt one) can check a token; the secret is shared by the whole
application through AppSettings.resume_secret.
"""

from __future__ import annotations

import base64
import hashlib
import hmac


def resume_token(secret: str, session_id: str) -> str:
    digest = hmac.new(secret.encode(), session_id.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest[:24]).decode()


def token_matches(secret: str, session_id: str, token: str) -> bool:
    return hmac.compare_digest(resume_token(secret, session_id), token)
