"""The production stack: docker-compose.yml checked against the Compose specification's schema
(vendored by check-jsonschema) and for the properties issue 18 asks of it, and prefect.yaml
registering the pipeline's deployments on a real Prefect server's work pool.

No Docker engine runs here, so the compose file is never started: these checks read it.
"""

from __future__ import annotations

import copy
import re
import subprocess

import pytest
import yaml

from tests.conftest import REPO

COMPOSE_FILE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
WORKER = "worker"
# Environment names that hold a credential.
SECRET_NAME = re.compile(r"PASSWORD|SECRET|AUTH_STRING|TOKEN")
# Compose interpolates ${NAME...} and $NAME; $$ escapes a dollar for the container's shell.
REFERENCE = re.compile(r"(?<!\$)\$(?:\{([A-Za-z_][A-Za-z0-9_]*)|([A-Za-z_][A-Za-z0-9_]*))")
REQUIRED_REFERENCE = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*:\?[^}]*\}$")
DEFAULTED_REFERENCE = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*:?-([^}]*)\}")


def load_compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def with_defaults(value: str) -> str:
    """`value` as compose resolves it with nothing set: ${NAME:-default} gives the default."""
    return DEFAULTED_REFERENCE.sub(lambda match: match.group(1), str(value))


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {name: str(value) for name, value in env.items()}


def schema_problems(compose: dict) -> list[str]:
    import jsonschema
    from check_jsonschema.builtin_schemas import get_builtin_schema

    schema = get_builtin_schema("vendor.compose-spec")
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{'/'.join(map(str, error.absolute_path))}: {error.message}" for error in validator.iter_errors(compose)]


def port_problems(compose: dict) -> list[str]:
    """Published ports that listen beyond 127.0.0.1 when .env changes nothing."""
    problems = []
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            if isinstance(port, dict):
                host_ip = with_defaults(port.get("host_ip", ""))
            else:
                parts = with_defaults(port).split(":")
                host_ip = parts[0] if len(parts) == 3 else ""
            if host_ip != "127.0.0.1":
                problems.append(f"{name}: {port!r} binds {host_ip or 'every interface'}")
    return problems


def strings(node) -> list[str]:
    if isinstance(node, dict):
        return [text for value in node.values() for text in strings(value)]
    if isinstance(node, list):
        return [text for value in node for text in strings(value)]
    return [node] if isinstance(node, str) else []


def url_passwords(text: str) -> list[str]:
    """The password of each `scheme://user:password@` in `text`. References are masked first:
    the message of a ${VAR:?message} may hold any character."""
    references: list[str] = []

    def mask(match: re.Match) -> str:
        references.append(match.group(0))
        return f"\0{len(references) - 1}\0"

    masked = re.sub(r"\$\{[^}]*\}", mask, text)
    passwords = re.findall(r"://[^:/@\s]*:([^@\s/]*)@", masked)
    return [re.sub(r"\0(\d+)\0", lambda match: references[int(match.group(1))], password) for password in passwords]


def secret_problems(compose: dict) -> list[str]:
    """Credentials written into the file rather than required from .env."""
    problems = []
    for name, service in compose["services"].items():
        for key, value in environment(service).items():
            if SECRET_NAME.search(key) and not REQUIRED_REFERENCE.match(value):
                problems.append(f"{name}: {key} is not a required ${{VAR:?...}} reference")
    for text in strings(compose):
        for password in url_passwords(text):
            if not REQUIRED_REFERENCE.match(password):
                problems.append(f"a connection URL holds the password {password!r}, not a required reference")
    return problems


def startup_order_problems(compose: dict) -> list[str]:
    """Services started before their dependencies are ready: every dependency is awaited healthy
    (it has a health check) or completed (a one-shot job), and every long-running service has a
    health check."""
    services = compose["services"]
    problems = []
    for name, service in services.items():
        if service.get("restart") != "no" and "healthcheck" not in service:
            problems.append(f"{name}: long-running without a healthcheck")
        depends_on = service.get("depends_on", {})
        if isinstance(depends_on, list):
            problems.append(f"{name}: depends_on without conditions")
            continue
        for dependency, rule in depends_on.items():
            condition = rule.get("condition")
            if condition == "service_healthy" and "healthcheck" not in services[dependency]:
                problems.append(f"{name} waits for {dependency} to be healthy, which has no healthcheck")
            elif condition == "service_completed_successfully" and services[dependency].get("restart") != "no":
                problems.append(f"{name} waits for {dependency} to complete, which restarts")
            elif condition not in ("service_healthy", "service_completed_successfully"):
                problems.append(f"{name}: depends on {dependency} with condition {condition!r}")
    return problems


def worker_problems(compose: dict) -> list[str]:
    """The worker must be a process worker on the pool, holding the GPUs."""
    worker = compose["services"][WORKER]
    problems = []
    command = " ".join(worker.get("command", []))
    if "worker start" not in command or "--type process" not in command or "--pool" not in command:
        problems.append(f"worker: command {command!r} is not `prefect worker start --pool ... --type process`")
    devices = worker.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    if not any(device.get("driver") == "nvidia" and "gpu" in device.get("capabilities", []) for device in devices):
        problems.append("worker: no nvidia GPU reserved in deploy.resources.reservations.devices")
    if not worker.get("build"):
        problems.append("worker: not built from the training image's Dockerfile")
    return problems


def referenced_variables(text: str) -> set[str]:
    return {braced or bare for braced, bare in REFERENCE.findall(text)}


def listed_variables(text: str) -> set[str]:
    return {line.split("=", 1)[0].strip() for line in text.splitlines() if re.match(r"^[A-Za-z_]\w*=", line)}


CHECKS = [schema_problems, port_problems, secret_problems, startup_order_problems, worker_problems]


@pytest.mark.parametrize("check", CHECKS, ids=[check.__name__ for check in CHECKS])
def test_compose_file(check):
    assert check(load_compose()) == []


def _break(compose: dict, check) -> dict:
    """A copy of the compose file with one mistake each check must catch."""
    broken = copy.deepcopy(compose)
    services = broken["services"]
    if check is schema_problems:
        services["mlflow"]["healthcheck"]["interval"] = ["10s"]
        services["postgres"]["deploy"] = {"replicas": "two"}
    elif check is port_problems:
        services["mlflow"]["ports"] = ["${MLFLOW_PORT:-5000}:5000"]
    elif check is secret_problems:
        services["postgres"]["environment"]["POSTGRES_PASSWORD"] = "hunter22"
        services["mlflow"]["environment"]["BACKEND_STORE_URI"] = "postgresql://omnilong:hunter22@postgres/mlflow"
    elif check is startup_order_problems:
        del services["postgres"]["healthcheck"]
    elif check is worker_problems:
        del services[WORKER]["deploy"]
    return broken


@pytest.mark.parametrize("check", CHECKS, ids=[check.__name__ for check in CHECKS])
def test_each_check_catches_a_broken_file(check):
    problems = check(_break(load_compose(), check))
    assert problems, f"{check.__name__} found nothing wrong in a broken compose file"
    if check is secret_problems:
        assert len(problems) == 2  # the environment variable and the URL


def test_env_is_ignored_and_the_example_lists_every_variable():
    ignored = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=REPO)
    assert ignored.returncode == 0, ".env must be git-ignored: it holds the stack's passwords"
    example_ignored = subprocess.run(["git", "check-ignore", "-q", ".env.example"], cwd=REPO)
    assert example_ignored.returncode == 1, ".env.example must be committed"
    referenced = referenced_variables(COMPOSE_FILE.read_text())
    listed = listed_variables(ENV_EXAMPLE.read_text())
    assert referenced - listed == set(), "used by docker-compose.yml, missing from .env.example"
    # prefect.yaml reads the pool's name from .env too.
    prefect_file = (REPO / "prefect.yaml").read_text()
    assert listed - referenced - set(re.findall(r"\{\{ \$(\w+) \}\}", prefect_file)) == set(), "unused"
    # Secrets are left empty in the example, so compose refuses to start until they are set.
    for name in listed:
        if SECRET_NAME.search(name):
            assert f"\n{name}=\n" in ENV_EXAMPLE.read_text(), f".env.example: {name} must be left empty"


def test_reference_parsing_skips_escaped_dollars():
    assert referenced_variables('a ${A:-1} $B $$C "$${D}" ${E:?set E}') == {"A", "B", "E"}
    assert url_passwords("postgresql://${U:-u}:${P:?set P: in .env}@db/x http://a:b@c") == ["${P:?set P: in .env}", "b"]


