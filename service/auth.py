"""API keys (Authorization: Bearer KEY) -> tenants. Keys are configured as sha256 digests and compared
in constant time; a key is never logged."""

from __future__ import annotations

import hmac

from fastapi import HTTPException, Request, status

from service.settings import Settings, hash_api_key

PUBLIC_TENANT = "public"


def tenant_for(request: Request, settings: Settings) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() == "bearer" and key:
        digest = hash_api_key(key.strip())
        match = None
        for known, tenant in settings.api_keys.items():
            if hmac.compare_digest(known, digest):  # no early exit on the first differing byte
                match = tenant
        if match is not None:
            return match
    if settings.open_mode:
        return PUBLIC_TENANT
    raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing or unknown API key: send 'Authorization: Bearer <key>'",
                        headers={"WWW-Authenticate": "Bearer"})
