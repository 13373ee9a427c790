"""The TLS listener option: our rendered Mosquitto config, certificates from make-certs.sh, passwords still needed."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from fleetwatch.credentials import mqtt_endpoint, render_mosquitto_config, service_credentials
from fleetwatch.settings import PROJECT_ROOT, Settings
from fleetwatch.stack import port_open, wait_for

pytestmark = pytest.mark.services


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def tls_broker(tmp_path: Path) -> Iterator[Settings]:
    s = Settings(run_dir=tmp_path, mqtt_port=free_port(), mqtt_tls_port=free_port(), mqtt_tls=True)
    conf = render_mosquitto_config(s, PROJECT_ROOT / "deploy")
    proc = subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(conf)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: port_open(s.mqtt_host, s.mqtt_tls_port), "Mosquitto TLS listener", 20)
        yield s
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def connect(s: Settings, user: str | None, password: str | None, ca: str | None) -> str:
    """CONNACK reason of one connection attempt to the TLS listener (or the error's name)."""
    host, port, _ = mqtt_endpoint(s)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"tls-{user}", protocol=mqtt.MQTTv5)
    if user:
        client.username_pw_set(user, password)
    if ca:
        client.tls_set(ca_certs=ca)
    elif ca is None:
        client.tls_set()  # the system's CAs, which do not know our local CA
    result: list[str] = []
    done = threading.Event()

    def on_connect(c: mqtt.Client, u: object, f: object, rc: object, p: object) -> None:
        result.append(str(rc))
        done.set()

    client.on_connect = on_connect
    try:
        client.connect(host, port, keepalive=10)
    except (ssl.SSLError, OSError) as exc:
        return type(exc).__name__
    client.loop_start()
    done.wait(5)
    client.disconnect()
    client.loop_stop()
    return result[0] if result else "no answer"


def test_tls_listener_needs_our_ca_and_still_a_password(tls_broker: Settings) -> None:
    s = tls_broker
    _, _, ca = mqtt_endpoint(s)
    certs = Path(ca).parent
    assert {p.name for p in certs.glob("*.crt")} == {"ca.crt", "server.crt", "client.crt"}
    assert (certs / "server.key").stat().st_mode & 0o077 == 0  # private keys are owner-only
    user, password = service_credentials(s, "bridge")
    assert connect(s, user, password, ca) == "Success"
    assert connect(s, None, None, ca) == "Not authorized"
    assert connect(s, user, "wrong", ca) != "Success"
    assert connect(s, user, password, None) == "SSLCertVerificationError"  # a server we have no CA for
