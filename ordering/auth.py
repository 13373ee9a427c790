"""API tokens with roles: secrets are shown once and stored only as SHA-256 hashes."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

from ordering.tables import api_tokens

ROLES = ("operator", "analyst", "admin")
# read: orders, trends, fleet, catalog · act: order transitions · admin: catalog edits and tokens
RIGHTS: dict[str, frozenset[str]] = {
    "analyst": frozenset({"read"}),
    "operator": frozenset({"read", "act"}),
    "admin": frozenset({"read", "act", "admin"}),
}
PREFIX = "fw_"


@dataclass(frozen=True)
class Principal:
    """Who is calling: the token's id, name and role."""

    token_id: int
    name: str
    role: str

    def can(self, right: str) -> bool:
        """True when the role grants ``right``."""
        return right in RIGHTS.get(self.role, frozenset())


def hash_token(secret: str) -> str:
    """The stored form of a token (tokens are long random strings, so a plain SHA-256 suffices)."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def create_token(session: Session, role: str, name: str) -> tuple[int, str]:
    """Create a token (caller commits); returns its id and the secret, which is never stored."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    secret = PREFIX + secrets.token_urlsafe(32)
    result = session.execute(insert(api_tokens).values(name=name, role=role, token_hash=hash_token(secret),
                                                       created_at=datetime.now(UTC)))
    return int(result.inserted_primary_key[0]), secret


def authenticate(session: Session, secret: str) -> Principal | None:
    """The principal for a presented secret, or None when unknown or revoked."""
    if not secret or len(secret) > 200:
        return None
    row = session.execute(select(api_tokens).where((api_tokens.c.token_hash == hash_token(secret))
                                                   & api_tokens.c.revoked_at.is_(None))).first()
    return Principal(int(row.id), row.name, row.role) if row else None


def revoke_token(session: Session, token_id: int) -> bool:
    """Revoke a token (caller commits); False when there is no such active token."""
    result = session.execute(update(api_tokens).where((api_tokens.c.id == token_id)
                                                      & api_tokens.c.revoked_at.is_(None))
                             .values(revoked_at=datetime.now(UTC)))
    return bool(result.rowcount)  # type: ignore[attr-defined]
