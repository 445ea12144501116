"""docker-compose.yml and the Dockerfile, held against the settings and commands the code has.

No Docker engine runs here, so the file is parsed, not started: every LEDGER_* variable it
sets must be a setting the code reads (and parse as one), every worker command must be a
real `ledger` command, and the services must be the ones the distributed mode needs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import typer.main
import yaml

from ledger.cli.app import app
from ledger.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return dict(compose["services"])


def _ledger_services(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in services.items() if s.get("image", "").startswith("ledger")}


def test_services_are_kafka_in_kraft_mode_postgres_two_ingest_workers_and_the_projector(
    services: dict[str, dict[str, Any]],
) -> None:
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = kafka["environment"]
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert "KAFKA_ZOOKEEPER_CONNECT" not in env
    assert not any("zookeeper" in name for name in services)
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    assert services["postgres"]["image"].startswith("postgres:")
    assert services["ingest"]["command"] == ["worker", "ingest"]
    assert services["ingest"]["deploy"]["replicas"] == 2
    assert services["project"]["command"] == ["worker", "project"]
    assert services["topics"]["command"] == ["topics", "create"]


def test_every_ledger_variable_is_a_setting_the_code_reads(
    services: dict[str, dict[str, Any]],
) -> None:
    ledger_services = _ledger_services(services)
    assert {"topics", "ingest", "project"} <= set(ledger_services)
    for name, service in ledger_services.items():
        env = service["environment"]
        unknown = [
            key
            for key in env
            if not key.startswith("LEDGER_")
            or key.removeprefix("LEDGER_").lower() not in Settings.model_fields
        ]
        assert not unknown, f"{name}: {unknown} are not fields of ledger.settings.Settings"
        for required in ("LEDGER_KAFKA", "LEDGER_STORE_URL", "LEDGER_MASTER_KEY"):
            assert env.get(required), f"{name} must set {required}"


def test_ledger_variables_parse_as_settings_and_point_at_the_compose_services(
    services: dict[str, dict[str, Any]],
) -> None:
    env = dict(services["ingest"]["environment"])
    assert env["LEDGER_MASTER_KEY"].startswith("${LEDGER_MASTER_KEY:?")
    env["LEDGER_MASTER_KEY"] = "ab" * 32
    settings = Settings(**{k.removeprefix("LEDGER_").lower(): v for k, v in env.items()})

    kafka_host, kafka_port = (settings.kafka or "").split(":")
    assert kafka_host in services
    advertised = services[kafka_host]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    assert f"//{kafka_host}:{kafka_port}" in advertised

    url = urlsplit(settings.store_url or "")
    pg = services[url.hostname or ""]["environment"]
    assert (url.username, url.password, url.path.lstrip("/")) == (
        pg["POSTGRES_USER"],
        pg["POSTGRES_PASSWORD"],
        pg["POSTGRES_DB"],
    )
    assert settings.partitions >= services["ingest"]["deploy"]["replicas"]


def test_worker_commands_are_real_ledger_commands(services: dict[str, dict[str, Any]]) -> None:
    root = typer.main.get_command(app)
    for name, service in _ledger_services(services).items():
        command = service.get("command")
        if command is None:
            continue
        group: Any = root
        for word in command:
            subcommands = getattr(group, "commands", None)
            assert subcommands is not None, f"{name}: {command} goes past a command"
            assert word in subcommands, f"{name}: `ledger {' '.join(command)}` does not exist"
            group = subcommands[word]


def test_workers_wait_for_their_dependencies(services: dict[str, dict[str, Any]]) -> None:
    for name in ("ingest", "project"):
        depends = services[name]["depends_on"]
        assert depends["postgres"]["condition"] == "service_healthy"
        assert depends["topics"]["condition"] == "service_completed_successfully"
    assert services["topics"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert services["kafka"]["healthcheck"] and services["postgres"]["healthcheck"]


def test_dockerfile_installs_the_package_with_the_worker_modules() -> None:
    text = (ROOT / "Dockerfile").read_text()
    for needed in ("COPY src", "COPY streams", "COPY projections", "pip install"):
        assert needed in text
    assert 'ENTRYPOINT ["ledger"]' in text
