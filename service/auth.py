"""API keys (Authorization: Bearer KEY) -> tenants. Keys are configured as sha256 digests and compared
in constant time; a key is never logged.

With keys configured, a request needs one of them; open mode (asked for explicitly: `IPT_OPEN_MODE=true` or
`ipt serve --open`) also serves requests without a key, as tenant `public`. A key that is sent but unknown
is a 401 in either mode: a client that believes it is authenticated must not land in the public tenant."""

from __future__ import annotations

import hmac

from fastapi import HTTPException, Request, status

from service.settings import Settings, hash_api_key

PUBLIC_TENANT = "public"


def tenant_for(request: Request, settings: Settings) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() == "bearer" and key.strip():
        digest = hash_api_key(key.strip())
        match = None
        for known, tenant in settings.api_keys.items():
            if hmac.compare_digest(known, digest):  # no early exit on the first differing byte
                match = tenant
        if match is not None:
            return match
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "unknown API key: send 'Authorization: Bearer <key>' "
                            "with a configured key",
                            headers={"WWW-Authenticate": "Bearer"})
    if settings.open_mode:
        return PUBLIC_TENANT
    raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing or unknown API key: send 'Authorization: Bearer <key>'",
                        headers={"WWW-Authenticate": "Bearer"})


def auth_mode(settings: Settings) -> str:
    """One line for the start-up log: which requests are served, as whom."""
    keys = len(settings.api_keys)
    if settings.open_mode:
        also = f"; the {keys} configured API key(s) still name their tenants" if keys else ""
        return f"auth: OPEN MODE - requests without an API key are served as tenant {PUBLIC_TENANT!r}{also}"
    if not keys:
        return ("auth: API keys required, but none is configured (IPT_API_KEYS): every request but the health "
                "routes answers 401")
    return f"auth: API keys required ({keys} configured); requests without a valid key answer 401"
