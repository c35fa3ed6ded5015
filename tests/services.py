"""The team stack of docker-compose.yml, started natively on loopback for the integration test.

No Docker engine runs here, so the test starts the same services as plain processes: PostgreSQL
(the MLflow backend, the MLflow auth store and the Prefect database), moto's S3 server in place
of MinIO (artifacts and the DVC remote), the MLflow tracking server with its basic-auth app and
the Prefect server with an API auth string. Each process gets its own process group on a free
127.0.0.1 port and is stopped by that group's id; `start` times each service's start.

Test support, not a product: a team runs the compose file, whose services these stand in for.
"""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.measure import free_port

HOST = "127.0.0.1"
BUCKET = "omnilong"
# The user part of the auth string: Prefect compares the whole "user:password" its clients send.
PREFECT_USER = "omnilong"
# SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3; the team extra installs psycopg2.
DRIVER = "postgresql+psycopg2"


def _postgres_bin(name: str) -> str:
    """A PostgreSQL server binary: Debian keeps most outside PATH (`pg_config --bindir`)."""
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        bindir = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True).stdout.strip()
        if (Path(bindir) / name).is_file():
            return str(Path(bindir) / name)
    found = shutil.which(name)
    if not found:
        raise RuntimeError(f"PostgreSQL's {name} is not installed (apt-get install postgresql)")
    return found


def _as_postgres(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run it as the `postgres` user."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


def http_status(url: str, headers: dict[str, str] | None = None, timeout_s: float = 3,
                json_body: bytes | None = None) -> int | None:
    """The HTTP status `url` answers a GET (a POST of `json_body`) with, or None while nothing listens."""
    headers = {**(headers or {}), **({"Content-Type": "application/json"} if json_body is not None else {})}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=json_body, headers=headers),
                                    timeout=timeout_s) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


def basic_auth(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


@dataclass
class Service:
    name: str
    process: subprocess.Popen
    log: Path
    start_s: float = 0.0
    # SIGTERM asks PostgreSQL for a "smart" shutdown that waits for clients; SIGINT is its fast one.
    stop_signal: int = signal.SIGTERM
    spawned_at: float = field(default_factory=time.monotonic)

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, self.stop_signal)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        # Children left in the group (a server's workers) go too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)


@dataclass
class Stack:
    root: Path
    db_password: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    mlflow_admin: tuple[str, str] = field(default_factory=lambda: ("admin", secrets.token_urlsafe(16)))
    prefect_auth_string: str = field(default_factory=lambda: f"{PREFECT_USER}:{secrets.token_urlsafe(16)}")
    aws: dict[str, str] = field(default_factory=lambda: {
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
    })
    ports: dict[str, int] = field(default_factory=dict)
    services: list[Service] = field(default_factory=list)

    # -- addresses ---------------------------------------------------------------------------
    def database_uri(self, database: str, driver: str = "postgresql") -> str:
        return f"{driver}://omnilong:{self.db_password}@{HOST}:{self.ports['postgres']}/{database}"

    @property
    def s3_endpoint(self) -> str:
        return f"http://{HOST}:{self.ports['s3']}"

    @property
    def mlflow_uri(self) -> str:
        return f"http://{HOST}:{self.ports['mlflow']}"

    @property
    def prefect_api(self) -> str:
        return f"http://{HOST}:{self.ports['prefect']}/api"

    def client_env(self) -> dict[str, str]:
        """What a client of the stack sets: credentials come from the environment, never params.
        MLflow artifacts go through the tracking server, so only DVC uses S3's address and keys."""
        return {
            **self.aws,
            "AWS_ENDPOINT_URL_S3": self.s3_endpoint,
            "MLFLOW_TRACKING_USERNAME": self.mlflow_admin[0],
            "MLFLOW_TRACKING_PASSWORD": self.mlflow_admin[1],
            "PREFECT_API_URL": self.prefect_api,
            "PREFECT_API_AUTH_STRING": self.prefect_auth_string,
        }

    def s3(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.s3_endpoint, aws_access_key_id=self.aws["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=self.aws["AWS_SECRET_ACCESS_KEY"],
                            region_name=self.aws["AWS_DEFAULT_REGION"])

    # -- processes ---------------------------------------------------------------------------
    def spawn(self, name: str, command: list[str], env: dict[str, str] | None = None,
              cwd: Path | None = None, stop_signal: int = signal.SIGTERM) -> Service:
        log = self.root / f"{name}.log"
        with log.open("ab") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                       start_new_session=True)  # its own group, stopped as a whole
        service = Service(name, process, log, stop_signal=stop_signal)
        self.services.append(service)
        return service

    def wait_until(self, service: Service, ready, timeout_s: float = 180) -> None:
        """Wait for `ready()`; the service's start time counts from its spawn."""
        deadline = time.monotonic() + timeout_s
        while not ready():
            if service.process.poll() is not None:
                raise RuntimeError(f"{service.name} exited with {service.process.returncode}:\n"
                                   f"{service.log.read_text(errors='replace')[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{service.name} not ready after {timeout_s:g} s:\n"
                                   f"{service.log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.5)
        service.start_s = time.monotonic() - service.spawned_at

    def stop(self) -> None:
        """Stop every service, the last started first (the clients before their stores)."""
        for service in reversed(self.services):
            service.stop()
        self.services.clear()

    # -- the services ------------------------------------------------------------------------
    def start_postgres(self) -> None:
        started = time.monotonic()
        home = self.root / "postgres"
        home.mkdir()
        (home / "socket").mkdir()
        password_file = home / "password"
        password_file.write_text(self.db_password + "\n")
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres")
            for path in (home, home / "socket", password_file):
                shutil.chown(path, "postgres")
        subprocess.run(_as_postgres([
            _postgres_bin("initdb"), "-D", str(home / "data"), "-U", "omnilong", f"--pwfile={password_file}",
            "--auth=scram-sha-256", "--encoding=UTF8", "--locale=C.UTF-8",
        ]), check=True, capture_output=True)
        self.ports["postgres"] = free_port()
        service = self.spawn("postgres", _as_postgres([
            _postgres_bin("postgres"), "-D", str(home / "data"), "-p", str(self.ports["postgres"]),
            "-c", f"listen_addresses={HOST}", "-c", f"unix_socket_directories={home / 'socket'}",
            "-c", "fsync=off",  # a throwaway cluster: durability buys nothing here
        ]), stop_signal=signal.SIGINT)

        def accepts() -> bool:
            import psycopg2

            try:
                psycopg2.connect(self.database_uri("postgres")).close()
                return True
            except psycopg2.OperationalError:
                return False

        self.wait_until(service, accepts, timeout_s=60)
        import psycopg2

        connection = psycopg2.connect(self.database_uri("postgres"))
        connection.autocommit = True
        with connection.cursor() as cursor:  # not `with connection`: CREATE DATABASE refuses a transaction
            for database in ("mlflow", "mlflow_auth", "prefect"):
                cursor.execute(f"CREATE DATABASE {database}")
        connection.close()
        service.start_s = time.monotonic() - started

    def start_s3(self, env: dict[str, str] | None = None) -> None:
        """moto's server (S3, and SageMaker for tests/test_sagemaker_launch.py) with `env` added."""
        self.ports["s3"] = free_port()
        service = self.spawn("s3", [str(Path(sys.executable).parent / "moto_server"), "-H", HOST,
                                    "-p", str(self.ports["s3"])], env={**os.environ, **self.aws, **(env or {})})
        self.wait_until(service, lambda: http_status(f"{self.s3_endpoint}/moto-api/") is not None, timeout_s=60)
        self.s3().create_bucket(Bucket=BUCKET)

    def spawn_mlflow(self):
        self.ports["mlflow"] = free_port()
        auth_config = self.root / "mlflow_auth.ini"
        auth_config.write_text(
            "[mlflow]\n"
            "default_permission = READ\n"
            f"database_uri = {self.database_uri('mlflow_auth', DRIVER)}\n"
            f"admin_username = {self.mlflow_admin[0]}\n"
            f"admin_password = {self.mlflow_admin[1]}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            # Without it every request re-derives the password's PBKDF2 hash: a pipeline makes thousands.
            "auth_cache_ttl_seconds = 60\n"
        )
        env = {**os.environ, **self.aws, "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint,
               "MLFLOW_AUTH_CONFIG_PATH": str(auth_config),
               # The auth app's CSRF protection signs with it; several servers must share it.
               "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_urlsafe(32)}
        service = self.spawn("mlflow", [
            str(Path(sys.executable).parent / "mlflow"), "server", "--app-name", "basic-auth",
            "--host", HOST, "--port", str(self.ports["mlflow"]), "--workers", "1",
            "--backend-store-uri", self.database_uri("mlflow", DRIVER),
            # Clients upload through the server (mlflow-artifacts:/), which alone holds S3 credentials.
            "--artifacts-destination", f"s3://{BUCKET}/mlflow",
        ], env=env, cwd=self.root)
        return service, lambda: http_status(f"{self.mlflow_uri}/health") == 200

    def spawn_prefect(self):
        self.ports["prefect"] = free_port()
        env = {
            **os.environ,
            "PREFECT_HOME": str(self.root / "prefect-server"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_API_DATABASE_CONNECTION_URL": self.database_uri("prefect", "postgresql+asyncpg"),
            "PREFECT_SERVER_API_AUTH_STRING": self.prefect_auth_string,
        }
        service = self.spawn("prefect", [
            sys.executable, "-m", "prefect", "server", "start", "--host", HOST, "--port", str(self.ports["prefect"]),
            "--no-ui",
        ], env=env, cwd=self.root)
        return service, lambda: http_status(f"{self.prefect_api}/health") == 200

    def start(self) -> None:
        self.start_postgres()
        self.start_s3()
        # The two servers migrate their databases as they start (tens of seconds each): side by side.
        for service, ready in [self.spawn_mlflow(), self.spawn_prefect()]:
            self.wait_until(service, ready)


@contextlib.contextmanager
def native_stack(logs: Path):
    """The started stack, stopped (by process group) however the body ends; the services' logs
    are copied to `logs`."""
    # Not under pytest's tmp dir: its 0700 parents keep the `postgres` user out.
    stack = Stack(Path(tempfile.mkdtemp(prefix="omnilong-stack-")))
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()
        for log in stack.root.glob("*.log"):
            shutil.copy2(log, logs / log.name)
        shutil.rmtree(stack.root, ignore_errors=True)
