"""A shared PostgreSQL, PgBouncer in front of it, and an MLflow tracking server on this machine,
for many workers (`make server`: see `mnist_sweep.server` for the command line and what it
starts for other machines)."""

from __future__ import annotations

import errno
import functools
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from mnist_sweep.base.errors import ConfigError, UserError
from mnist_sweep.base.urls import with_password

PG_USER = "mnist"
UNPRIVILEGED = "postgres"  # the Debian package's system user; PostgreSQL will not run as root


LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")

# PgBouncer in front of PostgreSQL: each worker process keeps its own SQLAlchemy pool (storage
# calls, heartbeats), so 1,000 workers would need ~2,000 server connections; PostgreSQL admits
# 100 (max_connections). In transaction mode a server connection is lent for one transaction
# only (milliseconds for Optuna's), so a few carry any number of workers: a client waits in
# PgBouncer's queue for one.
STUDY_CONNECTIONS = 15  # PostgreSQL connections PgBouncer lends the workers' study, at most
MAX_CLIENTS = 5000  # client connections the pooler admits (~1-3 per worker process)
# The MLflow server (uvicorn) runs up to 40 requests at once per process (anyio's thread limit),
# and MLflow's log_batch holds a database session (a transaction open) while it opens a second
# one for the metrics. With fewer connections than 40 x processes + 1 all of them can end up
# held by requests that wait for their second: a deadlock, which SQLAlchemy breaks after 30 s
# with "QueuePool limit reached" (a failed request). So each process gets 2 x 40 + 1 client
# connections to PgBouncer, and PgBouncer 40 x processes + 1 PostgreSQL connections for MLflow.
MLFLOW_REQUEST_THREADS = 40
MLFLOW_WORKERS = 2  # 2 x 40 + 1 = 81, + 15 for the study: 96 of PostgreSQL's 100 connections
# uvicorn kills (and restarts) a server process that does not answer its supervisor's ping
# within 5 s, and its requests in flight fail: on a busy machine (1,000 simulated workers on 2
# cores) that failed 24 trials' log_batch and duplicated 8 runs whose create was retried. A
# busy process is not a hung one: it gets 120 s.
MLFLOW_HEALTHCHECK_SECONDS = 120
# Without the pooler the MLflow server reaches PostgreSQL directly with 20 connections a process
# (the deadlock above is then possible under a heavy load: `--no-pooler` is for small sweeps).
MLFLOW_DIRECT_POOL = 20


def mlflow_pooled_connections(workers: int) -> int:
    """PostgreSQL connections PgBouncer lends the MLflow server's `workers` processes."""
    return MLFLOW_REQUEST_THREADS * workers + 1


def write_private(path: Path, text: str) -> None:
    """Write a secret file that is mode 600 from its first byte: a new file made with that mode
    (never world-readable, whatever the umask), then renamed over the old one."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def machine_interfaces() -> list[ipaddress.IPv4Interface | ipaddress.IPv6Interface]:
    """This machine's addresses with their networks (from `ip -o addr`), loopback included."""
    try:
        out = subprocess.run(
            ["ip", "-o", "addr", "show"], capture_output=True, text=True, timeout=5
        )
        found = [
            ipaddress.ip_interface(line.split()[3])
            for line in out.stdout.splitlines()
            if len(line.split()) > 3 and line.split()[2] in ("inet", "inet6")
        ]
    except (OSError, subprocess.SubprocessError, ValueError):
        found = []
    if not found:  # no iproute2: the addresses the host name resolves to, as single hosts
        infos = socket.getaddrinfo(socket.gethostname(), None)
        found = [ipaddress.ip_interface(info[4][0]) for info in infos]
    return [i for i in found if not i.ip.is_link_local]


def machine_names() -> list[str]:
    """This machine's host names and addresses: what other machines may call it."""
    names = [socket.gethostname(), socket.getfqdn()]
    names += [str(i.ip) for i in machine_interfaces()]
    return list(dict.fromkeys(n for n in names if n))


def host_name() -> str:
    """This machine's name for other machines: its fully qualified name when it has one."""
    fqdn = socket.getfqdn()
    return fqdn if "." in fqdn and not fqdn.startswith("localhost") else socket.gethostname()


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def default_networks(host: str) -> list[str]:
    """The networks PostgreSQL admits by default: none beyond this machine when it listens on
    loopback; else those of the interfaces it listens on (all of them for 0.0.0.0)."""
    if is_loopback(host):
        return []
    interfaces = [i for i in machine_interfaces() if not i.ip.is_loopback]
    if host not in ("0.0.0.0", "::", "*"):
        try:
            address = ipaddress.ip_address(socket.gethostbyname(host))
        except (OSError, ValueError):
            return []
        interfaces = [i for i in interfaces if i.ip == address] or [ipaddress.ip_interface(address)]
    return list(dict.fromkeys(str(i.network) for i in interfaces))


def check_networks(networks: list[str]) -> list[str]:
    out = []
    for net in networks:
        try:
            out.append(str(ipaddress.ip_network(net, strict=False)))
        except ValueError:
            raise ConfigError(
                f"--allow-net {net!r} is not a network: give an address with its "
                "prefix length, such as 10.0.0.0/8, 192.168.1.0/24 or 10.1.2.3/32 "
                "(one host)."
            ) from None
    return out


def mlflow_host_patterns(hosts: list[str]) -> list[str]:
    """MLflow's --allowed-hosts patterns (fnmatch) for host names/addresses, any port: a Host
    header is `name` or `name:port` (IPv6 `[addr]:port`)."""
    patterns = []
    for host in hosts:
        if ":" in host and not host.startswith("["):  # IPv6
            host = f"[{host}]"
        escaped = host.replace("[", "[[]", 1) if host.startswith("[") else host
        patterns += [host, f"{escaped}:*"]
    return list(dict.fromkeys(patterns))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_port(host: str, port: int, flag: str) -> None:
    """The address is one of this machine's and the port is free, before anything starts."""
    if not 1 <= port <= 65535:
        raise ConfigError(f"{flag} {port} is not a TCP port: use 1-65535.")
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except socket.gaierror:
            raise ConfigError(
                f"--host {host!r} is not an address or host name this machine "
                "resolves; use 127.0.0.1 (default) or one of its addresses."
            ) from None
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise ConfigError(
                    f"{flag} {port} on {host} is already in use (another server, "
                    "or a `make server` still running?); choose another port with "
                    f"{flag}."
                ) from None
            raise ConfigError(
                f"--host {host!r} cannot be listened on ({error.strerror}); use "
                "127.0.0.1 (default) or an address of this machine."
            ) from None


def _as_unprivileged(cmd: list[str], keep_limits: bool = False) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    if keep_limits:
        return [
            "setpriv",
            f"--reuid={UNPRIVILEGED}",
            f"--regid={UNPRIVILEGED}",
            "--init-groups",
            *cmd,
        ]
    return ["runuser", "-u", UNPRIVILEGED, "--", *cmd]


@dataclass
class Postgres:
    folder: Path
    port: int
    password: str
    host: str = "127.0.0.1"  # the address it listens on
    advertise: str | None = None  # the name in the URLs it hands out (default: host)
    networks: list[str] = field(default_factory=list)  # admitted beyond this machine

    @property
    def data(self) -> Path:
        return self.folder / "data"

    def url(self, database: str) -> str:
        return with_password(
            "postgresql", PG_USER, self.password, self.advertise or self.host, self.port, database
        )

    def write_hba(self) -> None:
        """pg_hba.conf: this machine (socket and loopback) and the allowed networks, each with
        a scram-sha-256 password; nothing else is admitted."""
        (self.data / "pg_hba.conf").write_text("\n".join(self.hba_lines()) + "\n")

    def hba_lines(self) -> list[str]:
        lines = [
            "# Written by mnist-sweep at every start (python -m mnist_sweep.server --allow-net).",
            "local all all scram-sha-256",
            "host all all 127.0.0.1/32 scram-sha-256",
            "host all all ::1/128 scram-sha-256",
        ]
        lines += [f"host all {PG_USER} {net} scram-sha-256" for net in self.networks]
        return lines

    def _run(self, *cmd: str, env: dict | None = None) -> subprocess.CompletedProcess:
        out = subprocess.run(
            _as_unprivileged(list(cmd)),
            capture_output=True,
            text=True,
            env={**os.environ, **(env or {})},
        )
        if out.returncode != 0:
            raise UserError(f"{cmd[0]} failed: {' '.join(out.stderr.split())[:400]}")
        return out

    def init(self) -> None:
        if (self.data / "PG_VERSION").exists():
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.folder, UNPRIVILEGED, UNPRIVILEGED)
        pwfile = self.folder / "pwfile"
        write_private(pwfile, self.password + "\n")
        if os.geteuid() == 0:
            shutil.chown(pwfile, UNPRIVILEGED, UNPRIVILEGED)
        try:
            self._run(
                "initdb",
                "-D",
                str(self.data),
                "-U",
                PG_USER,
                "--auth=scram-sha-256",
                f"--pwfile={pwfile}",
                "--encoding=UTF8",
            )
        finally:
            pwfile.unlink(missing_ok=True)

    def start(self) -> None:
        self.init()
        self.write_hba()
        listen = "*" if self.host in ("0.0.0.0", "::") else self.host
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.folder / "postgres.log"),
            "-w",
            "-t",
            "60",
            "-o",
            f"-h '{listen}' -p {self.port} -k '{self.folder}'",
            "start",
        )  # through a shell

    def stop(self, mode: str = "fast") -> None:
        subprocess.run(
            _as_unprivileged(["pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop"]),
            capture_output=True,
        )

    def create_databases(self, *names: str) -> None:
        # Through the server's Unix socket: whatever --host and --allow-net say.
        env, at = {"PGPASSWORD": self.password}, ["-h", str(self.folder), "-p", str(self.port)]
        existing = self._run(
            "psql",
            *at,
            "-U",
            PG_USER,
            "-d",
            "postgres",
            "-Atc",
            "select datname from pg_database",
            env=env,
        ).stdout.split()
        for name in names:
            if name not in existing:
                self._run("createdb", *at, "-U", PG_USER, name, env=env)


@dataclass
class PgBouncer:
    """PgBouncer (Debian's `pgbouncer`, 1.18+) in transaction mode on `port`, lending at most
    `pools[database]` PostgreSQL connections to any number of clients of each database: `optuna`
    (the workers) and `mlflow` (the MLflow server's processes).
    It admits what PostgreSQL admits (the same pg_hba lines, scram-sha-256) and logs in to
    PostgreSQL with the same user and password; it runs as the unprivileged user, as PostgreSQL."""

    folder: Path
    port: int
    password: str
    upstream: Postgres
    pools: dict[str, int] = field(default_factory=lambda: {"optuna": STUDY_CONNECTIONS})
    process: subprocess.Popen | None = None

    @property
    def config(self) -> Path:
        return self.folder / "pgbouncer.ini"

    def write_config(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.folder, UNPRIVILEGED, UNPRIVILEGED)
        users = self.folder / "userlist.txt"  # the password: mode 600, the server user's
        write_private(users, f'"{PG_USER}" "{self.password}"\n')
        hba = self.folder / "hba.conf"
        hba.write_text("\n".join(self.upstream.hba_lines()) + "\n")
        host = self.upstream.host
        listen = "*" if host in ("0.0.0.0", "::") else host
        self.config.write_text(
            "\n".join(
                [
                    "; Written by mnist-sweep at every start (python -m mnist_sweep.server).",
                    "[databases]",
                    *(
                        f"{name} = host=127.0.0.1 port={self.upstream.port} dbname={name} "
                        f"pool_size={size} max_db_connections={size}"
                        for name, size in self.pools.items()
                    ),
                    "[pgbouncer]",
                    f"listen_addr = {listen}",
                    f"listen_port = {self.port}",
                    f"unix_socket_dir = {self.folder}",
                    "auth_type = hba",
                    f"auth_hba_file = {hba}",
                    f"auth_file = {users}",
                    "pool_mode = transaction",
                    "reserve_pool_size = 0",
                    f"max_client_conn = {MAX_CLIENTS}",
                    # a client waits for a free server connection rather than failing: the
                    # queue is the pooler's back-pressure under load
                    "query_wait_timeout = 300",
                    f"logfile = {self.folder / 'pgbouncer.log'}",
                    "log_connections = 0",
                    "log_disconnections = 0",
                    "stats_period = 60",
                    f"admin_users = {PG_USER}",
                ]
            )
            + "\n"
        )
        for path in (users, hba, self.config):
            if os.geteuid() == 0:
                shutil.chown(path, UNPRIVILEGED, UNPRIVILEGED)

    @property
    def address(self) -> str:
        host = self.upstream.host
        return "127.0.0.1" if host in ("0.0.0.0", "::") else host

    def url(self, database: str, scheme: str = "postgresql") -> str:
        host = self.upstream.advertise or self.upstream.host
        return with_password(scheme, PG_USER, self.password, host, self.port, database)

    def start(self) -> None:
        if shutil.which("pgbouncer") is None:
            raise UserError(
                "pgbouncer is not installed: the shared servers put it in front of PostgreSQL so "
                "that many workers share a bounded number of connections. Install it "
                "(apt-get install pgbouncer) or start the servers with --no-pooler."
            )
        self.write_config()
        log = open(self.folder / "pgbouncer.out", "ab")
        self.process = subprocess.Popen(
            # setpriv, not runuser: runuser's PAM session would set the open-files limit back
            # to 1,024, and PgBouncer needs one file per client
            _as_unprivileged(["pgbouncer", str(self.config)], keep_limits=True),
            stdout=log,
            stderr=log,
            start_new_session=True,
            preexec_fn=functools.partial(_enough_file_descriptors, sum(self.pools.values())),
        )
        deadline = time.time() + 30
        while time.time() < deadline:
            if self.process.poll() is not None:
                tail = (self.folder / "pgbouncer.log").read_text(errors="replace")[-400:]
                raise UserError(f"pgbouncer exited at start: {' '.join(tail.split())}")
            with socket.socket() as probe:
                if probe.connect_ex((self.address, self.port)) == 0:
                    return
            time.sleep(0.1)
        raise UserError(f"pgbouncer did not listen on port {self.port} within 30 s.")

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
            self.process = None


def _enough_file_descriptors(server_connections: int) -> None:
    """The pooler holds one socket per client: raise the soft limit to the hard one."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = MAX_CLIENTS + server_connections + 100
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))


def start_mlflow_server(
    backend_url: str,
    artifacts: Path,
    port: int,
    host: str = "127.0.0.1",
    log_file: Path | None = None,
    allowed_hosts: list[str] | None = None,
    workers: int = MLFLOW_WORKERS,
    pool: int = MLFLOW_DIRECT_POOL,
) -> subprocess.Popen:
    """`mlflow server` as a child process; the backend URL (with its password) goes through the
    environment, not the command line. It answers Host headers naming `allowed_hosts` (and this
    machine's loopback names), any port; a browser's UI is allowed from the same names.

    `workers` server processes, each with a backend pool of `pool` connections, whatever the
    number of sweep workers (they talk HTTP to the server, never to the database)."""
    artifacts.mkdir(parents=True, exist_ok=True)
    # No GenAI job runner: MLflow 3 starts 6 huey consumer processes for it (~250 MB and an MLflow
    # import each) that tracking never uses
    env = {
        **os.environ,
        "MLFLOW_BACKEND_STORE_URI": backend_url,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_SQLALCHEMYSTORE_POOL_SIZE": str(pool // 2),
        "MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW": str(pool - pool // 2),
    }
    names = list(dict.fromkeys([*LOOPBACK_HOSTS, *(allowed_hosts or [])]))
    origins = [f"http://{f'[{n}]' if ':' in n else n}:{port}" for n in names]
    log = open(log_file, "ab") if log_file else subprocess.DEVNULL
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            host,
            "--port",
            str(port),
            "--artifacts-destination",
            str(artifacts),
            "--workers",
            str(workers),
            "--uvicorn-opts",
            f"--timeout-worker-healthcheck {MLFLOW_HEALTHCHECK_SECONDS}",
            "--allowed-hosts",
            ",".join(mlflow_host_patterns(names)),
            "--cors-allowed-origins",
            ",".join(origins),
        ],
        env=env,
        stdout=log,
        stderr=log,
        start_new_session=True,
    )
    probe = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    wait_for_http(f"http://{f'[{probe}]' if ':' in probe else probe}:{port}/health", process)
    return process


def wait_for_http(
    url: str, process: subprocess.Popen, timeout: float = 120, what: str = "The MLflow server"
) -> None:
    """Until `url` answers 200. A refused connection and a slow answer (a server still starting on
    a loaded machine) both mean "not yet"; the process exiting means never."""
    import requests

    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise UserError(
                f"{what} exited with status {process.returncode} before "
                f"answering at {url}; see its log."
            )
        try:
            if requests.get(url, timeout=10).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise UserError(f"{what} did not answer at {url} within {timeout:.0f} s.")


def stop_process(process: subprocess.Popen, timeout: float = 20) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@dataclass
class LocalServers:
    """PostgreSQL (databases optuna and mlflow) and an MLflow server backed by it, on one machine:
    what `make server` runs and what the tests start, stop and restart.

    `host`: the address both listen on; `advertise`: the name workers use in their URLs;
    `networks`: where PostgreSQL admits workers from (beyond this machine); `allowed_hosts`: the
    names the MLflow server answers to (beyond localhost)."""

    folder: Path
    password: str
    pg_port: int = 5433
    mlflow_port: int = 5001
    host: str = "127.0.0.1"
    advertise: str | None = None
    networks: list[str] = field(default_factory=list)
    allowed_hosts: list[str] = field(default_factory=list)
    pooler_port: int | None = 6432  # None: no pooler, workers connect to PostgreSQL directly
    mlflow_workers: int = MLFLOW_WORKERS
    mlflow: subprocess.Popen | None = None

    def __post_init__(self) -> None:
        self.pg = Postgres(
            self.folder / "postgres",
            self.pg_port,
            self.password,
            self.host,
            self.advertise,
            self.networks,
        )
        pools = {
            "optuna": STUDY_CONNECTIONS,
            "mlflow": mlflow_pooled_connections(self.mlflow_workers),
        }
        self.pooler = (
            PgBouncer(self.folder / "pgbouncer", self.pooler_port, self.password, self.pg, pools)
            if self.pooler_port is not None
            else None
        )

    @property
    def storage_url(self) -> str:
        """The study's URL for workers: through the pooler when there is one."""
        return self.pooler.url("optuna") if self.pooler else self.pg.url("optuna")

    @property
    def direct_storage_url(self) -> str:
        """The study's database without the pooler (administration, `pg_stat_activity`)."""
        return self.pg.url("optuna")

    @property
    def tracking_url(self) -> str:
        name = self.advertise or self.host
        return f"http://{f'[{name}]' if ':' in name else name}:{self.mlflow_port}"

    @property
    def mlflow_log(self) -> Path:
        return self.folder / "mlflow-server.log"

    def start(self) -> None:
        self.pg.start()
        try:
            self.pg.create_databases("optuna", "mlflow")
            if self.pooler:
                self.pooler.start()
            self.start_mlflow()
        except BaseException:
            self.stop()
            raise

    def start_mlflow(self) -> None:
        self.mlflow = start_mlflow_server(
            # through the pooler with psycopg2: psycopg 3 prepares a statement run 5 times on the
            # server, which transaction pooling cannot keep (the next one may run on another)
            self.pooler.url("mlflow", "postgresql+psycopg2")
            if self.pooler
            else self.pg.url("mlflow"),
            self.folder / "artifacts",
            self.mlflow_port,
            self.host,
            self.mlflow_log,
            [self.host, self.advertise or self.host, *self.allowed_hosts],
            self.mlflow_workers,
            2 * MLFLOW_REQUEST_THREADS + 1 if self.pooler else MLFLOW_DIRECT_POOL,
        )

    def stop_mlflow(self) -> None:
        if self.mlflow is not None:
            stop_process(self.mlflow)
            self.mlflow = None

    def stop(self) -> None:
        self.stop_mlflow()
        if self.pooler:
            self.pooler.stop()
        self.pg.stop()
