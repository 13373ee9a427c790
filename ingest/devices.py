"""Device identity for Mosquitto: its password file (PBKDF2-SHA512 hashes) and a small device registry."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from ingest.contract import TRACTOR_ID_RE

# Mosquitto 2.x understands "$7$<iterations>$<salt b64>$<hash b64>" (PBKDF2-HMAC-SHA512).
HASH_ITERATIONS = 1000
SALT_BYTES = 12
# Service users contain a dot, which no tractor id may contain, so the two namespaces never collide.
SERVICE_PREFIX = "svc."


class DeviceError(ValueError):
    """A device id or registry operation that cannot be carried out."""


@dataclass
class Device:
    """One registered identity: a tractor or a service user."""

    username: str
    kind: str  # "tractor" | "service"
    added_at: str
    revoked_at: str | None = None

    @property
    def active(self) -> bool:
        """True while the device may connect."""
        return self.revoked_at is None


def hash_password(password: str, salt: bytes | None = None, iterations: int = HASH_ITERATIONS) -> str:
    """A password hash in Mosquitto's ``$7$`` format."""
    salt = salt if salt is not None else secrets.token_bytes(SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_password(password: str, hashed: str) -> bool:
    """True when ``password`` matches a ``$7$`` hash (what Mosquitto checks at CONNECT)."""
    try:
        _, kind, iterations, salt, digest = hashed.split("$")
        if kind != "7":
            return False
        got = hashlib.pbkdf2_hmac("sha512", password.encode(), base64.b64decode(salt), int(iterations))
    except ValueError:
        return False
    return secrets.compare_digest(base64.b64encode(got).decode(), digest)


def new_password() -> str:
    """A random 32-character password (URL-safe)."""
    return secrets.token_urlsafe(24)


def check_tractor_id(tractor_id: str) -> str:
    """The id itself when it may be a tractor's MQTT username, else DeviceError."""
    if not TRACTOR_ID_RE.match(tractor_id):
        raise DeviceError(f"{tractor_id[:40]!r} is not a tractor id (1-32 characters of A-Z a-z 0-9 _ -)")
    return tractor_id


def _write_private(path: Path, text: str) -> None:
    """Write a file readable by its owner only, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


class DeviceRegistry:
    """Mosquitto's password file plus a JSON registry of who was added and revoked when."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.passwd = folder / "passwd"
        self.registry = folder / "devices.json"

    # ------------------------------------------------------------ files
    def _hashes(self) -> dict[str, str]:
        if not self.passwd.exists():
            return {}
        out: dict[str, str] = {}
        for line in self.passwd.read_text().splitlines():
            if ":" in line and not line.startswith("#"):
                user, hashed = line.split(":", 1)
                out[user] = hashed
        return out

    def _save_hashes(self, hashes: dict[str, str]) -> None:
        _write_private(self.passwd, "".join(f"{u}:{h}\n" for u, h in sorted(hashes.items())))

    def _devices(self) -> dict[str, Device]:
        if not self.registry.exists():
            return {}
        return {d["username"]: Device(**d) for d in json.loads(self.registry.read_text())}

    def _save_devices(self, devices: dict[str, Device]) -> None:
        _write_private(self.registry, json.dumps([asdict(d) for d in devices.values()], indent=1))

    # ------------------------------------------------------------ operations
    def set_password(self, username: str, password: str, kind: str) -> None:
        """Create or replace one identity's password (stored hashed only)."""
        hashes = self._hashes()
        hashes[username] = hash_password(password)
        self._save_hashes(hashes)
        devices = self._devices()
        devices[username] = Device(username, kind, datetime.now(UTC).isoformat(timespec="seconds"))
        self._save_devices(devices)

    def add_tractor(self, tractor_id: str, password: str | None = None) -> str:
        """Register a tractor and return its password (shown once; only the hash is kept)."""
        check_tractor_id(tractor_id)
        if tractor_id in self._hashes():
            raise DeviceError(f"{tractor_id} is already registered; revoke it first to issue a new password")
        password = password or new_password()
        self.set_password(tractor_id, password, "tractor")
        return password

    def revoke(self, username: str) -> Device:
        """Remove an identity's password so it can no longer connect; keeps it listed as revoked."""
        hashes = self._hashes()
        devices = self._devices()
        if username not in hashes:
            raise DeviceError(f"{username[:40]!r} is not an active device")
        if username.startswith(SERVICE_PREFIX):
            raise DeviceError(f"{username} is a service user managed by the stack")
        del hashes[username]
        self._save_hashes(hashes)
        device = devices.get(username) or Device(username, "tractor", "")
        device.revoked_at = datetime.now(UTC).isoformat(timespec="seconds")
        devices[username] = device
        self._save_devices(devices)
        return device

    def list(self) -> list[Device]:
        """Every identity ever registered, active ones with a password."""
        hashes = self._hashes()
        devices = self._devices()
        for user in hashes:
            devices.setdefault(user, Device(user, "service" if user.startswith(SERVICE_PREFIX) else "tractor", ""))
        return sorted(devices.values(), key=lambda d: (d.kind, d.username))

    def check(self, username: str, password: str) -> bool:
        """True when the password file would let ``username`` in with ``password``."""
        hashed = self._hashes().get(username)
        return hashed is not None and verify_password(password, hashed)
