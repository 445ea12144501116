"""`ledger worker ...` and `ledger topics create` refuse unusable settings with a sentence."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from broker import free_port
from ledger.cli.app import app


@pytest.mark.parametrize("command", [["worker", "ingest"], ["worker", "project"]])
def test_workers_without_kafka_setting_fail_naming_the_variable(
    command: list[str], tmp_path: Path
) -> None:
    result = CliRunner().invoke(
        app, command, env={"LEDGER_HOME": str(tmp_path), "LEDGER_KAFKA": ""}
    )
    assert result.exit_code == 1
    assert "LEDGER_KAFKA is not set" in result.output
    assert "Traceback" not in result.output


def test_topics_create_with_no_broker_fails_within_the_configured_time(tmp_path: Path) -> None:
    env = {
        "LEDGER_HOME": str(tmp_path),
        "LEDGER_KAFKA": f"127.0.0.1:{free_port()}",
        "LEDGER_KAFKA_MAX_BLOCK_MS": "1000",
    }
    result = CliRunner().invoke(app, ["topics", "create"], env=env)
    assert result.exit_code == 1
    assert "cannot reach a Kafka broker at 127.0.0.1" in result.output


def test_worker_help_lists_both_workers() -> None:
    result = CliRunner().invoke(app, ["worker", "--help"])
    assert result.exit_code == 0
    assert "ingest" in result.output and "project" in result.output
