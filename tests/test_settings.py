"""Settings: env vars and flags with the same names, validation with fix-it messages."""

from __future__ import annotations

import pytest

from hivetrain.settings import (
    SERVICE_SETTINGS,
    BootstrapSettings,
    MinerSettings,
    SwarmSettings,
    ValidatorSettings,
    env_names,
    load_settings,
)


@pytest.mark.parametrize("model", [*SERVICE_SETTINGS.values(), SwarmSettings])
def test_every_field_reads_its_hive_env_var(model, monkeypatch):
    assert model.model_config["env_prefix"] == "HIVE_"
    monkeypatch.setenv("HIVE_RUN_ID", "from-env")
    assert load_settings(model, []).run_id == "from-env"


@pytest.mark.parametrize("model", [*SERVICE_SETTINGS.values(), SwarmSettings])
def test_every_field_has_help_text(model):
    missing = [name for name, field in model.model_fields.items() if not field.description]
    assert not missing


def test_flag_wins_over_env(monkeypatch):
    monkeypatch.setenv("HIVE_TARGET_BATCH_SIZE", "100")
    monkeypatch.setenv("HIVE_BOOTSTRAP_URL", "http://boot:8000/")
    settings = load_settings(MinerSettings, ["--target-batch-size", "7", "--delay-grad-averaging",
                                             "--delay-optimizer-step", "--offload-optimizer"])
    assert settings.target_batch_size == 7
    assert settings.delay_grad_averaging and settings.offload_optimizer
    assert settings.bootstrap_url == "http://boot:8000"


def test_list_settings_from_env_json(monkeypatch):
    monkeypatch.setenv("HIVE_INITIAL_PEERS", '["/ip4/127.0.0.1/tcp/1/p2p/Qm1"]')
    assert load_settings(MinerSettings, []).initial_peers == ["/ip4/127.0.0.1/tcp/1/p2p/Qm1"]


def test_errors_name_env_var_flag_and_value(monkeypatch):
    monkeypatch.setenv("HIVE_BATCH_SIZE", "-1")
    with pytest.raises(SystemExit) as error:
        load_settings(MinerSettings, ["--device", "tpu", "--redis-url", "http://x"])
    message = str(error.value)
    assert "HIVE_BATCH_SIZE / --batch-size" in message and "'-1'" in message
    assert "HIVE_DEVICE / --device: Value error, use auto, cpu, cuda or cuda:N (got 'tpu')" in message
    assert "redis://" in message


@pytest.mark.parametrize("flags, fix", [
    (["--use-local-updates", "--delay-grad-averaging", "--delay-optimizer-step", "--offload-optimizer"], "HIVE_USE_LOCAL_UPDATES"),
    (["--delay-grad-averaging"], "HIVE_DELAY_OPTIMIZER_STEP=true"),
    (["--delay-optimizer-step"], "HIVE_OFFLOAD_OPTIMIZER=true"),
])
def test_hivemind_combinations_are_checked_up_front(flags, fix):
    with pytest.raises(SystemExit, match=fix):
        load_settings(MinerSettings, flags)


@pytest.mark.parametrize("model, field, value", [
    (MinerSettings, "run_id", "has space"),
    (MinerSettings, "host_maddrs", '["0.0.0.0:31337"]'),
    (BootstrapSettings, "http_port", "70000"),
    (ValidatorSettings, "chain", "ethereum"),
    (SwarmSettings, "miners", "-2"),
])
def test_bad_values_are_rejected(model, field, value, monkeypatch):
    monkeypatch.setenv(f"HIVE_{field.upper()}", value)
    with pytest.raises(SystemExit, match=f"HIVE_{field.upper()}"):
        load_settings(model, [])


def test_env_names_cover_shared_fields():
    names = env_names(MinerSettings)
    assert {"HIVE_REDIS_URL", "HIVE_RUN_ID", "HIVE_BOOTSTRAP_URL", "HIVE_WALLET_DIR", "HIVE_TARGET_BATCH_SIZE"} <= names
    assert "HIVE_HTTP_PORT" not in names
