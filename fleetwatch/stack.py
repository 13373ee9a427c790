"""The local stack: Kafka, Mosquitto, PostgreSQL and Fleetwatch workers under one supervisord."""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from fleetwatch.settings import PROJECT_ROOT, Settings

DEPLOY = PROJECT_ROOT / "deploy"
INFRA = ("kafka", "mosquitto", "postgres")
WORKERS = ("bridge", "fn-trends", "fn-ordering", "api")


def new_cluster_id() -> str:
    """A random KRaft cluster id (base64url UUID) that does not start with '-', as Kafka's own Uuid avoids too."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


class StackError(RuntimeError):
    """A component of the local stack could not be installed, started or reached."""


@dataclass(frozen=True)
class Program:
    """One supervised process."""

    name: str
    command: str
    directory: Path
    user: str | None = None
    environment: dict[str, str] | None = None
    stopwaitsecs: int = 30


def _bin(name: str) -> str:
    """Path of a console script installed next to the running interpreter."""
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.exists() else name


def _as_root() -> bool:
    return os.geteuid() == 0


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """True when something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for(check: object, what: str, timeout: float) -> None:
    """Poll ``check()`` until it is true or raise StackError naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.3)
    raise StackError(f"{what} did not become ready within {timeout:.0f}s")


class Stack:
    """Installs, configures, starts, stops and reports the local components."""

    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.run = settings.run_dir
        self.conf = self.run / "supervisord.conf"

    # ---------------------------------------------------------------- install
    def kafka_libs(self) -> Path:
        """Folder holding the Kafka jars, fetched from Maven Central once."""
        libs = self.s.cache_dir / "kafka" / "libs"
        if libs.is_dir() and any(libs.glob("kafka_2.13-*.jar")):
            return libs
        mvn = shutil.which("mvn")
        if not mvn:
            raise StackError("Maven (mvn) is needed to fetch Kafka; run `make install` or apt-get install maven")
        tmp = libs.with_name("libs.partial")
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [mvn, "-q", "-B", "-f", str(DEPLOY / "kafka" / "pom.xml"), "dependency:copy-dependencies",
               f"-DoutputDirectory={tmp}", "-DincludeScope=runtime"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise StackError(f"fetching Kafka jars failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
        tmp.rename(libs)
        return libs

    @staticmethod
    def ensure_debian_packages() -> None:
        """Install Mosquitto and PostgreSQL from Debian's packages when missing."""
        missing = [pkg for pkg, binary in (("mosquitto", "mosquitto"), ("postgresql", "initdb"))
                   if not (shutil.which(binary) or Path("/usr/sbin", binary).exists() or _pg_bin(binary))]
        if not missing:
            return
        if not _as_root() or not shutil.which("apt-get"):
            raise StackError(f"please install {' '.join(missing)} (Debian packages)")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env)

    @staticmethod
    def ensure_browser() -> Path:
        """Debian's Chromium for the operator-page browser tests, installed from the archive when missing."""
        found = shutil.which("chromium") or next((p for p in ("/usr/bin/chromium",) if Path(p).exists()), None)
        if found:
            return Path(found)
        if not _as_root() or not shutil.which("apt-get"):
            raise StackError("please install chromium (Debian package); the browser tests drive it headless")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"], check=True,
                       env=env)
        return Path(shutil.which("chromium") or "/usr/bin/chromium")

    # ---------------------------------------------------------------- configs
    def kafka_nodes(self) -> list[tuple[str, int, int]]:
        """(program name, client port, controller port) of each Kafka node; one node unless a cluster is set."""
        s = self.s
        if s.kafka_brokers == 1:
            return [("kafka", s.kafka_port, s.kafka_controller_port)]
        return [(f"kafka-{i}", s.kafka_port + 10 * (i - 1), s.kafka_controller_port + 10 * (i - 1))
                for i in range(1, s.kafka_brokers + 1)]

    def _kafka_programs(self) -> list[Program]:
        """One KRaft node per broker (combined broker+controller), formatted on first start."""
        s = self.s
        nodes = self.kafka_nodes()
        replicas = str(min(len(nodes), 3))
        voters = ",".join(f"{i}@{s.kafka_host}:{cport}" for i, (_, _, cport) in enumerate(nodes, start=1))
        libs = self.kafka_libs()
        java = shutil.which("java") or "java"
        root = self.run / "kafka"
        root.mkdir(parents=True, exist_ok=True)
        id_file = root / "cluster.id"
        cluster_id = id_file.read_text().strip() if id_file.exists() else ""
        if not cluster_id or cluster_id.startswith("-"):  # a leading '-' reads as an option to kafka-storage
            cluster_id = new_cluster_id()
            id_file.write_text(cluster_id + "\n")
        programs = []
        for node_id, (name, port, cport) in enumerate(nodes, start=1):
            d = root if len(nodes) == 1 else root / name
            d.mkdir(parents=True, exist_ok=True)
            props = {
                "process.roles": "broker,controller",
                "node.id": str(node_id),
                "controller.quorum.voters": voters,
                "listeners": f"PLAINTEXT://{s.kafka_host}:{port},CONTROLLER://{s.kafka_host}:{cport}",
                "advertised.listeners": f"PLAINTEXT://{s.kafka_host}:{port}",
                "controller.listener.names": "CONTROLLER",
                "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
                "inter.broker.listener.name": "PLAINTEXT",
                "log.dirs": str(d / "data"),
                "num.partitions": str(s.kafka_partitions),
                "default.replication.factor": replicas,
                "min.insync.replicas": str(s.kafka_min_insync),
                "offsets.topic.replication.factor": replicas,
                "offsets.topic.num.partitions": "8",
                "transaction.state.log.replication.factor": replicas,
                "transaction.state.log.min.isr": str(min(s.kafka_min_insync, len(nodes))),
                "share.coordinator.state.topic.replication.factor": replicas,
                "group.initial.rebalance.delay.ms": "0",
                "auto.create.topics.enable": "false",
                "unclean.leader.election.enable": "false",
                "log.retention.hours": "168",
            }
            (d / "server.properties").write_text("".join(f"{k}={v}\n" for k, v in props.items()))
            (d / "log4j2.properties").write_text(
                "rootLogger.level=INFO\nrootLogger.appenderRef.f.ref=F\n"
                "appender.f.type=RollingFile\nappender.f.name=F\n"
                f"appender.f.fileName={d / 'server.log'}\nappender.f.filePattern={d / 'server.log.%i'}\n"
                "appender.f.layout.type=PatternLayout\nappender.f.layout.pattern=[%d] %p %m (%c)%n\n"
                "appender.f.policies.type=Policies\nappender.f.policies.size.type=SizeBasedTriggeringPolicy\n"
                "appender.f.policies.size.size=20MB\nappender.f.strategy.type=DefaultRolloverStrategy\n"
                "appender.f.strategy.max=3\n"
            )
            base = (f"{java} -Xms128m -Xmx{s.kafka_heap} -XX:+UseG1GC -cp '{libs}/*' "
                    f"-Dlog4j2.configurationFile={d / 'log4j2.properties'}")
            if not (d / "data" / "meta.properties").exists():
                fmt_cmd = f"{base} kafka.tools.StorageTool format -t {cluster_id} -c {d / 'server.properties'}"
                fmt = subprocess.run(fmt_cmd, shell=True, capture_output=True, text=True)
                if fmt.returncode != 0:
                    raise StackError(f"formatting Kafka storage failed: {fmt.stdout[-1000:]}{fmt.stderr[-1000:]}")
            programs.append(Program(name, f"{base} kafka.Kafka {d / 'server.properties'}", d, stopwaitsecs=20))
        return programs

    def _mosquitto_program(self) -> Program:
        from fleetwatch.credentials import render_mosquitto_config

        # Config, ACL, password file with the generated service users (bridge, simulator), TLS certificates.
        conf = render_mosquitto_config(self.s, DEPLOY)
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        return Program("mosquitto", f"{binary} -c {conf}", conf.parent)

    def _postgres_dir(self, user: str | None) -> Path:
        """Where PostgreSQL keeps its cluster: the run folder, unless the ``postgres`` user cannot reach it."""
        d = self.run / "postgres"
        d.mkdir(parents=True, exist_ok=True)
        if not user:
            return d
        shutil.chown(d, user, user)
        if subprocess.run(["runuser", "-u", user, "--", "test", "-w", str(d)]).returncode == 0:
            return d
        # A checkout under a folder closed to other users (e.g. mode 700): keep the cluster outside it.
        digest = hashlib.sha1(str(self.run).encode()).hexdigest()[:12]
        outside = Path("/var/tmp/fleetwatch") / digest / "postgres"
        outside.mkdir(parents=True, exist_ok=True)
        for parent in (outside.parent.parent, outside.parent, outside):
            os.chmod(parent, 0o755)
        shutil.chown(outside, user, user)
        return outside

    def _postgres_program(self) -> Program:
        user = "postgres" if _as_root() else None
        d = self._postgres_dir(user)
        data = d / "data"
        if not (data / "PG_VERSION").exists():
            cmd = [_pg_bin("initdb") or "initdb", "-D", str(data), "-U", self.s.pg_user, "--auth=trust",
                   "-E", "UTF8", "--no-instructions"]
            if user:
                cmd = ["runuser", "-u", user, "--", *cmd]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0:
                raise StackError(f"initdb failed: {result.stderr[-1000:]}")
        postgres = _pg_bin("postgres") or "postgres"
        cmd = (f"{postgres} -D {data} -p {self.s.pg_port} -k {d} -c listen_addresses=127.0.0.1 "
               "-c fsync=on -c shared_buffers=128MB -c max_connections=100")
        return Program("postgres", cmd, d, user=user)

    def _worker_programs(self) -> list[Program]:
        env = {k: v for k, v in os.environ.items() if k.startswith("FLEETWATCH_")}
        env.setdefault("FLEETWATCH_RUN_DIR", str(self.run))
        fw = _bin("fleetwatch")
        d = self.run / "workers"
        d.mkdir(parents=True, exist_ok=True)
        return [
            Program("bridge", f"{fw} ingest run --workers {self.s.ingest_workers}", d, environment=env),
            Program("fn-trends", f"{fw} functions run trends-detect", d, environment=env),
            Program("fn-ordering", f"{fw} functions run ordering-place", d, environment=env),
            Program("api", f"{fw} api serve", d, environment=env),
        ]

    def write_config(self, names: Iterable[str]) -> None:
        """Write supervisord.conf with the named programs."""
        self.run.mkdir(parents=True, exist_ok=True)
        (self.run / "logs").mkdir(exist_ok=True)
        names = list(names)
        builders = {"mosquitto": self._mosquitto_program, "postgres": self._postgres_program}
        programs: list[Program] = []
        if any(n == "kafka" or n.startswith("kafka-") for n in names):
            programs += self._kafka_programs()
        programs += [builders[n]() for n in names if n in builders]
        programs += [p for p in self._worker_programs() if p.name in names]
        lines = [
            "[unix_http_server]", f"file={self.run / 'supervisor.sock'}", "",
            "[supervisord]", f"logfile={self.run / 'logs' / 'supervisord.log'}",
            f"pidfile={self.run / 'supervisord.pid'}", "nodaemon=false", "user=root" if _as_root() else "", "",
            "[rpcinterface:supervisor]",
            "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface", "",
            "[supervisorctl]", f"serverurl=unix://{self.run / 'supervisor.sock'}", "",
        ]
        for p in programs:
            lines += [
                f"[program:{p.name}]", f"command={p.command}", f"directory={p.directory}",
                "autostart=false", "autorestart=unexpected", "startsecs=1", "startretries=3",
                f"stopwaitsecs={p.stopwaitsecs}", "stopasgroup=true", "killasgroup=true",
                f"stdout_logfile={self.run / 'logs' / (p.name + '.log')}", "redirect_stderr=true",
                "stdout_logfile_maxbytes=20MB", "stdout_logfile_backups=2",
            ]
            if p.user:
                lines.append(f"user={p.user}")
            if p.environment:
                env = ",".join(f'{k}="{v.replace("%", "%%")}"' for k, v in sorted(p.environment.items()))
                lines.append(f"environment={env}")
            lines.append("")
        self.conf.write_text("\n".join(lines))

    # ---------------------------------------------------------------- control
    def _ctl(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        return subprocess.run([_bin("supervisorctl"), "-c", str(self.conf), *args], capture_output=True,
                              text=True, check=check)

    def supervisor_running(self) -> bool:
        """True when this run folder's supervisord answers."""
        if not self.conf.exists():
            return False
        out = self._ctl("pid")
        return out.returncode == 0 and out.stdout.strip().isdigit()

    def _configured(self) -> set[str]:
        if not self.conf.exists():
            return set()
        return {line[9:-1] for line in self.conf.read_text().splitlines() if line.startswith("[program:")}

    def start(self, names: Iterable[str]) -> None:
        """Start the named programs (idempotent) and wait until each is ready."""
        names = self._expand(names)
        wanted = sorted(self._configured() | set(names))
        self.write_config(wanted)
        if not self.supervisor_running():
            subprocess.run([_bin("supervisord"), "-c", str(self.conf)], check=True)
            wait_for(self.supervisor_running, "supervisord", 20)
        else:
            self._ctl("reread")
            self._ctl("update")
        for name in names:  # start all first: a Kafka cluster needs a quorum before any node is ready
            out = self._ctl("start", name)
            if out.returncode != 0 and "already started" not in out.stdout:
                raise StackError(f"{name} failed to start: {out.stdout.strip()}; see {self.run / 'logs' / name}.log")
        for name in names:
            self.wait_ready(name)

    def _expand(self, names: Iterable[str]) -> list[str]:
        """Program names, with "kafka" standing for every Kafka node."""
        nodes = [n for n, _, _ in self.kafka_nodes()]
        out: list[str] = []
        for n in names:
            out += nodes if n == "kafka" else [n]
        return list(dict.fromkeys(out))

    def wait_ready(self, name: str) -> None:
        """Block until a started component accepts work."""
        s = self.s
        ports = {n: p for n, p, _ in self.kafka_nodes()}
        if name in ports:
            wait_for(lambda: port_open(s.kafka_host, ports[name]), f"Kafka ({name})", 90)
            wait_for(self._kafka_answers, "Kafka metadata", 60)
        elif name == "mosquitto":
            wait_for(lambda: port_open(s.mqtt_host, s.mqtt_port), "Mosquitto", 30)
        elif name == "bridge":  # metrics port opens once subscribed: nothing published after this is lost
            wait_for(lambda: port_open(s.mqtt_host, s.ingest_metrics_base), "ingest bridge", 60)
        elif name == "postgres":
            wait_for(lambda: port_open("127.0.0.1", s.pg_port), "PostgreSQL", 60)
            self._create_pg_database()
        elif name == "api":
            wait_for(lambda: port_open(s.api_host, s.api_port), "API", 30)

    def _kafka_answers(self) -> bool:
        from kafka import KafkaAdminClient

        try:
            admin = KafkaAdminClient(bootstrap_servers=self.s.bootstrap, request_timeout_ms=5000)
        except Exception:
            return False
        try:
            admin.list_topics()
            return True
        except Exception:
            return False
        finally:
            admin.close()

    def _create_pg_database(self) -> None:
        import psycopg

        def ready() -> bool:
            try:
                with psycopg.connect(f"host=127.0.0.1 port={self.s.pg_port} user={self.s.pg_user} dbname=postgres",
                                     autocommit=True, connect_timeout=3) as conn:
                    exists = conn.execute("SELECT 1 FROM pg_database WHERE datname=%s", (self.s.pg_db,)).fetchone()
                    if not exists:
                        conn.execute(f'CREATE DATABASE "{self.s.pg_db}"')
                return True
            except psycopg.OperationalError:
                return False

        wait_for(ready, "PostgreSQL database", 60)

    def stop(self, names: Iterable[str]) -> None:
        """Stop the named programs, leaving the rest running."""
        if self.supervisor_running():
            for name in self._expand(names):
                self._ctl("stop", name)

    def signal(self, name: str, sig: str) -> None:
        """Send a signal (e.g. KILL) to one program; supervisord restarts it if it dies unexpectedly."""
        out = self._ctl("signal", sig, name)
        if out.returncode != 0:
            raise StackError(f"could not signal {name}: {out.stdout.strip()}")

    def _supervisord_pid(self) -> int | None:
        """Pid of this run folder's supervisord while that process is alive."""
        try:
            pid = int((self.run / "supervisord.pid").read_text().strip())
            os.kill(pid, 0)
            return pid
        except (OSError, ValueError):
            return None

    def down(self) -> None:
        """Stop every program and supervisord itself, waiting until the processes are gone."""
        if self.supervisor_running():
            self._ctl("shutdown")
        if self._supervisord_pid() is not None:
            wait_for(lambda: self._supervisord_pid() is None, "supervisord shutdown", 180)

    def status(self) -> dict[str, str]:
        """State of each configured program, e.g. {'kafka': 'RUNNING'}."""
        if not self.supervisor_running():
            return dict.fromkeys(sorted(self._configured()), "STOPPED")
        out = self._ctl("status").stdout
        result: dict[str, str] = {}
        for line in out.splitlines():
            parts = line.split()
            if len(parts) >= 2:
                result[parts[0]] = parts[1]
        return result


def _pg_bin(name: str) -> str | None:
    """Path of a PostgreSQL server binary from Debian's versioned folder."""
    found = shutil.which(name)
    if found:
        return found
    for candidate in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True):
        return str(candidate)
    return None
