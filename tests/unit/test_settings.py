"""Settings: the one reader of the environment, frozen, and strict about LIVECOPY_ keys."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from pydantic import ValidationError

from core.settings import Settings, UnknownSetting, load_settings, unknown_keys
from livecopy.cli import cli, register


def test_environment_and_nested_keys_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIVECOPY_REDIS__URL", "redis://h:1/0")
    monkeypatch.setenv("LIVECOPY_KAFKA__CLIENT_CONFIG", '{"security.protocol": "SSL"}')
    monkeypatch.setenv("LIVECOPY_TOPICS__COPY", "site.copy")
    s = load_settings()
    assert s.redis.url == "redis://h:1/0"
    assert s.kafka.client_config == {"security.protocol": "SSL"}
    assert s.topics.copy_ == "site.copy"


@pytest.mark.parametrize("key", ["LIVECOPY_REDIS__URLL", "LIVECOPY_REDDIS__URL", "LIVECOPY_LOGLEVEL",
                                 "livecopy_api__portt"])
def test_an_unknown_key_stops_start_up_naming_it(monkeypatch: pytest.MonkeyPatch, key: str) -> None:
    monkeypatch.setenv(key, "1")
    with pytest.raises(UnknownSetting, match=key.upper()):
        load_settings()


def test_dict_settings_take_any_key_and_other_variables_are_left_alone() -> None:
    assert unknown_keys(["LIVECOPY_KAFKA__CLIENT_CONFIG", "LIVECOPY_PROFILE__TYPE_WEIGHTS", "PATH",
                         "LIVECOPY_LOG_LEVEL", "LIVECOPY_GENERATION__MAX_WAIT_MS"]) == []


def test_an_unknown_key_in_an_env_file_is_refused(tmp_path: Path) -> None:
    env = tmp_path / "lc.env"
    env.write_text("LIVECOPY_API__PORT=8181\nUNRELATED=1\n")
    assert load_settings(env).api.port == 8181
    env.write_text("LIVECOPY_API__PORTT=8181\n")
    with pytest.raises(UnknownSetting, match="LIVECOPY_API__PORTT"):
        load_settings(env)


def test_settings_are_frozen() -> None:
    s = Settings()
    with pytest.raises(ValidationError):
        s.redis.url = "redis://elsewhere"  # type: ignore[misc]
    with pytest.raises(ValidationError):
        s.log_level = "DEBUG"  # type: ignore[misc]
    assert s.with_endpoints("b:9092", "redis://r:6379/0").redis.url == "redis://r:6379/0"  # copies are how to change


def test_the_cli_refuses_to_start_with_an_unknown_key(tmp_path: Path) -> None:
    register(cli)
    env = {"LIVECOPY_REDIS__URLL": "redis://typo", "LIVECOPY_TRAINER__REGISTRY_DIR": str(tmp_path)}
    res = CliRunner().invoke(cli, ["models", "list"], env=env)
    assert res.exit_code != 0
    assert "LIVECOPY_REDIS__URLL" in res.output
    ok = CliRunner().invoke(cli, ["models", "list"], env={"LIVECOPY_TRAINER__REGISTRY_DIR": str(tmp_path)})
    assert ok.exit_code == 0, ok.output
