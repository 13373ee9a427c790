"""MQTT service credentials (bridge, simulator) that the stack generates and the workers look up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from fleetwatch.settings import Settings
from ingest.devices import SERVICE_PREFIX, DeviceRegistry, new_password

ROLES = ("bridge", "simulator")


class CredentialsError(OSError):
    """Service credentials are missing: the stack has not provisioned this run folder yet."""


def mosquitto_dir(settings: Settings) -> Path:
    """Run folder of our Mosquitto: password file, ACL, device registry, certificates."""
    return settings.run_dir / "mosquitto"


def _credentials_file(settings: Settings) -> Path:
    return mosquitto_dir(settings) / "service-credentials.json"


def registry(settings: Settings) -> DeviceRegistry:
    """The device registry (Mosquitto password file + devices.json) of this run folder."""
    return DeviceRegistry(mosquitto_dir(settings))


def ensure_service_credentials(settings: Settings) -> None:
    """Generate the service users' passwords once (file mode 0600) and keep the password file in step."""
    path = _credentials_file(settings)
    reg = registry(settings)
    creds: dict[str, dict[str, str]] = json.loads(path.read_text()) if path.exists() else {}
    changed = False
    for role in ROLES:
        if role not in creds:
            creds[role] = {"username": f"{SERVICE_PREFIX}{role}", "password": new_password()}
            changed = True
        user, password = creds[role]["username"], creds[role]["password"]
        if not reg.check(user, password):
            reg.set_password(user, password, "service")
    if changed:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(creds, f)


def service_credentials(settings: Settings, role: str) -> tuple[str, str]:
    """(username, password) of a service user ("bridge" or "simulator") of this run folder's Mosquitto."""
    if role not in ROLES:
        raise ValueError(f"unknown service role {role!r}; one of {', '.join(ROLES)}")
    path = _credentials_file(settings)
    if not path.exists():
        raise CredentialsError(f"no MQTT service credentials in {path.parent}; start the stack first (fleetwatch up)")
    entry = json.loads(path.read_text())[role]
    return entry["username"], entry["password"]


def tractor_credentials(settings: Settings, tractor_id: str) -> tuple[str, str]:
    """(username, password) of a *simulated* tractor, registered on first use (per-tractor simulator mode).

    Real tractors get their password once from ``fleetwatch devices add``; only simulated ones are kept in
    the run folder (mode 0600) so the simulator can log in as each of them.
    """
    from ingest.devices import check_tractor_id

    check_tractor_id(tractor_id)
    path = mosquitto_dir(settings) / "simulated-tractors.json"
    known: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}
    reg = registry(settings)
    password = known.get(tractor_id)
    if password is None or not reg.check(tractor_id, password):
        password = new_password()
        reg.set_password(tractor_id, password, "tractor")
        known[tractor_id] = password
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(known, f)
        reload_mosquitto(settings)
        time.sleep(0.2)  # Mosquitto re-reads the password file on SIGHUP, asynchronously
    return tractor_id, password


def reload_mosquitto(settings: Settings) -> bool:
    """Make a running Mosquitto re-read its password file and ACL (SIGHUP); False when it is not running.

    Mosquitto disconnects clients whose credentials are no longer valid when it reloads.
    """
    conf = settings.run_dir / "supervisord.conf"
    if not conf.exists():
        return False
    ctl = Path(sys.executable).with_name("supervisorctl")
    result = subprocess.run([str(ctl) if ctl.exists() else "supervisorctl", "-c", str(conf), "signal", "HUP",
                             "mosquitto"], capture_output=True, text=True)
    return result.returncode == 0 and "ERROR" not in result.stdout


def certs_dir(settings: Settings) -> Path:
    """Where the local CA and the server/client certificates of the TLS listener live."""
    return mosquitto_dir(settings) / "certs"


def render_mosquitto_config(settings: Settings, deploy: Path) -> Path:
    """Write our Mosquitto's config, ACL and password file (and TLS certificates when asked); returns the config."""
    import getpass

    d = mosquitto_dir(settings)
    (d / "data").mkdir(parents=True, exist_ok=True)
    ensure_service_credentials(settings)
    (d / "acl.conf").write_text((deploy / "mosquitto" / "acl.conf").read_text())
    tls = ""
    if settings.mqtt_tls_port:
        certs = certs_dir(settings)
        if not (certs / "server.crt").exists():
            result = subprocess.run(["bash", str(deploy / "mosquitto" / "make-certs.sh"), str(certs),
                                     settings.mqtt_host, "localhost"], capture_output=True, text=True)
            if result.returncode != 0:
                raise CredentialsError(f"making TLS certificates failed: {result.stderr[-500:]}")
        tls = "\n".join([f"listener {settings.mqtt_tls_port} {settings.mqtt_host}", f"cafile {certs / 'ca.crt'}",
                         f"certfile {certs / 'server.crt'}", f"keyfile {certs / 'server.key'}",
                         "tls_version tlsv1.2", "require_certificate false", ""])
    template = (deploy / "mosquitto" / "mosquitto.conf").read_text()
    conf = template.format(port=settings.mqtt_port, host=settings.mqtt_host, data=d / "data", user=getpass.getuser(),
                           passwd=d / "passwd", acl=d / "acl.conf", tls=tls)
    (d / "mosquitto.conf").write_text(conf)
    return d / "mosquitto.conf"


def mqtt_endpoint(settings: Settings) -> tuple[str, int, str | None]:
    """(host, port, CA file or None) that clients of this stack connect to: TLS when ``mqtt_tls`` is set."""
    if settings.mqtt_tls:
        if not settings.mqtt_tls_port:
            raise CredentialsError("FLEETWATCH_MQTT_TLS needs FLEETWATCH_MQTT_TLS_PORT (the TLS listener)")
        return settings.mqtt_host, settings.mqtt_tls_port, str(certs_dir(settings) / "ca.crt")
    return settings.mqtt_host, settings.mqtt_port, None
