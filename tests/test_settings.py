"""Settings: env vars and flags with the same names, validation with fix-it messages."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from hivetrain.settings import (
    SERVICE_SETTINGS,
    BootstrapSettings,
    ConfigError,
    MinerSettings,
    SwarmSettings,
    ValidatorSettings,
    env_names,
    known_variables,
    load_settings,
    service_env,
    unread_variables,
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
    settings = load_settings(
        MinerSettings,
        ["--target-batch-size", "7", "--delay-grad-averaging", "--delay-optimizer-step", "--offload-optimizer"],
    )
    assert settings.target_batch_size == 7
    assert settings.delay_grad_averaging and settings.offload_optimizer
    assert settings.bootstrap_url == "http://boot:8000"


def test_list_settings_from_env_json(monkeypatch):
    monkeypatch.setenv("HIVE_INITIAL_PEERS", '["/ip4/127.0.0.1/tcp/1/p2p/Qm1"]')
    assert load_settings(MinerSettings, []).initial_peers == ["/ip4/127.0.0.1/tcp/1/p2p/Qm1"]


def test_list_settings_from_env_comma_separated(monkeypatch):
    # was a SettingsError traceback: pydantic-settings parses a list variable as JSON only
    monkeypatch.setenv("HIVE_HOST_MADDRS", "/ip4/0.0.0.0/tcp/1, /ip4/0.0.0.0/tcp/2")
    monkeypatch.setenv("HIVE_ANNOUNCE_MADDRS", "")
    settings = load_settings(MinerSettings, [])
    assert settings.host_maddrs == ["/ip4/0.0.0.0/tcp/1", "/ip4/0.0.0.0/tcp/2"] and settings.announce_maddrs == []


def test_a_misspelt_flag_names_the_closest_one():
    with pytest.raises(ConfigError, match=r"MinerSettings has no flag --batchsize; did you mean --batch-size\?"):
        load_settings(MinerSettings, ["--batchsize", "4"])
    with pytest.raises(ConfigError, match="no flag --miner"):
        load_settings(BootstrapSettings, ["--miner=3"])
    assert load_settings(MinerSettings, ["--no-use-relay"]).use_relay is False  # a boolean's negation is a flag


def test_a_hive_variable_nothing_reads_is_named_with_the_closest_setting():
    lines = unread_variables({"HIVE_BATCHSIZE": "4", "HIVE_BATCH_SIZE": "4", "HIVE_IMAGE_TAG": "x", "PATH": "/bin"})
    assert lines == ["HIVE_BATCHSIZE is set but no setting reads it; did you mean HIVE_BATCH_SIZE?"]


def test_every_hive_variable_the_repo_names_is_read_by_something():
    root = Path(__file__).resolve().parents[1]
    files = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True).stdout.split()
    named = {}
    for name in files:
        path = root / name
        if name.startswith("tests/") or not path.is_file() or path.suffix in {".png", ".ico", ".gz", ".pdf"}:
            continue
        for variable in re.findall(r"\bHIVE_[A-Z0-9_]*[A-Z0-9]\b", path.read_text(errors="replace")):
            named.setdefault(variable, name)
    unknown = {variable: where for variable, where in named.items() if variable not in known_variables()}
    assert not unknown, f"named but read by nothing (a setting, or settings.OTHER_VARIABLES): {unknown}"


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hivetrain.miner", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", **(env or {})},
    )


def test_the_cli_exits_2_on_a_configuration_error_naming_the_setting():
    bad = _cli(env={"HIVE_BATCH_SIZE": "abc"})
    assert bad.returncode == 2 and "HIVE_BATCH_SIZE / --batch-size" in bad.stderr, bad.stderr[-2000:]
    assert "Traceback" not in bad.stderr
    typo = _cli("--batchsize", "4")
    assert typo.returncode == 2 and "did you mean --batch-size?" in typo.stderr and "usage:" not in typo.stderr
    version = _cli("--version")
    assert version.returncode == 0 and re.fullmatch(r"hivetrain \d+\.\d+\.\d+\n", version.stdout)
    helped = _cli("--help", env={"HIVE_BATCHSIZE": "4"})
    assert helped.returncode == 0 and "did you mean HIVE_BATCH_SIZE?" in helped.stderr


def test_a_swarm_of_no_miners_is_refused_on_the_command_line():
    refused = subprocess.run(
        [sys.executable, "-m", "hivetrain.swarm", "--miners", "0"], capture_output=True, text=True, timeout=120
    )
    assert refused.returncode == 2 and "--miners 0 (HIVE_MINERS=0) starts a swarm without miners" in refused.stderr


def test_errors_name_env_var_flag_and_value(monkeypatch):
    monkeypatch.setenv("HIVE_BATCH_SIZE", "-1")
    with pytest.raises(ConfigError) as error:
        load_settings(MinerSettings, ["--device", "tpu", "--redis-url", "http://x"])
    message = str(error.value)
    assert "HIVE_BATCH_SIZE / --batch-size" in message and "'-1'" in message
    assert "HIVE_DEVICE / --device: Value error, use auto, cpu, cuda or cuda:N (got 'tpu')" in message
    assert "redis://" in message


@pytest.mark.parametrize(
    "flags, fix",
    [
        (
            ["--use-local-updates", "--delay-grad-averaging", "--delay-optimizer-step", "--offload-optimizer"],
            "HIVE_USE_LOCAL_UPDATES",
        ),
        (["--delay-grad-averaging"], "HIVE_DELAY_OPTIMIZER_STEP=true"),
        (["--delay-optimizer-step"], "HIVE_OFFLOAD_OPTIMIZER=true"),
    ],
)
def test_hivemind_combinations_are_checked_up_front(flags, fix):
    with pytest.raises(ConfigError, match=fix):
        load_settings(MinerSettings, flags)


@pytest.mark.parametrize(
    "model, field, value",
    [
        (MinerSettings, "run_id", "has space"),
        (MinerSettings, "host_maddrs", '["0.0.0.0:31337"]'),
        (BootstrapSettings, "http_port", "70000"),
        (ValidatorSettings, "chain", "ethereum"),
        (SwarmSettings, "miners", "-2"),
    ],
)
def test_bad_values_are_rejected(model, field, value, monkeypatch):
    monkeypatch.setenv(f"HIVE_{field.upper()}", value)
    with pytest.raises(ConfigError, match=f"HIVE_{field.upper()}"):
        load_settings(model, [])


def test_env_names_cover_shared_fields():
    names = env_names(MinerSettings)
    assert {"HIVE_REDIS_URL", "HIVE_RUN_ID", "HIVE_BOOTSTRAP_URL", "HIVE_WALLET_DIR", "HIVE_TARGET_BATCH_SIZE"} <= names
    assert "HIVE_HTTP_PORT" not in names


def test_service_env_writes_what_the_settings_read_back(monkeypatch):
    env = service_env(
        MinerSettings,
        batch_size=4,
        lr=0.003,
        delay_state_averaging=False,
        preset="tiny",
        host_maddrs=["/ip4/127.0.0.1/tcp/0"],
        bootstrap_url="http://boot:8000/",
    )
    assert env == {
        "HIVE_BATCH_SIZE": "4",
        "HIVE_LR": "0.003",
        "HIVE_DELAY_STATE_AVERAGING": "false",
        "HIVE_PRESET": "tiny",
        "HIVE_HOST_MADDRS": '["/ip4/127.0.0.1/tcp/0"]',
        "HIVE_BOOTSTRAP_URL": "http://boot:8000",
    }  # validated: the field validator strips the slash
    for key in list(env_names(MinerSettings)):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = load_settings(MinerSettings, [])
    assert (settings.batch_size, settings.lr, settings.delay_state_averaging) == (4, 0.003, False)
    assert settings.host_maddrs == ["/ip4/127.0.0.1/tcp/0"] and settings.preset == "tiny"


def test_service_env_rejects_a_misspelt_setting():
    with pytest.raises(ValueError, match=r"MinerSettings has no setting 'batchsize'.*did you mean 'batch_size'"):
        service_env(MinerSettings, batchsize=4)
    with pytest.raises(ValueError, match="BootstrapSettings has no setting 'batch_size'"):
        service_env(BootstrapSettings, batch_size=4)  # a miner setting is not the bootstrap's


@pytest.mark.parametrize(
    "model, values, message",
    [
        (
            MinerSettings,
            {"batch_size": 0},
            r"MinerSettings.batch_size \(HIVE_BATCH_SIZE\): Input should be greater than or equal to 1",
        ),
        (MinerSettings, {"target_batch_size": "many"}, "HIVE_TARGET_BATCH_SIZE.*valid integer"),
        (MinerSettings, {"device": "tpu"}, "HIVE_DEVICE.*use auto, cpu, cuda or cuda:N"),  # a field validator
        (MinerSettings, {"host_maddrs": ["0.0.0.0:31337"]}, "is not a multiaddr"),
        (ValidatorSettings, {"spot_check_dim": 12}, "multiple of 8"),
        (SwarmSettings, {"preset": "huge"}, "HIVE_PRESET.*'seed' or 'tiny'"),
    ],
)
def test_service_env_rejects_an_invalid_value(model, values, message):
    with pytest.raises(ValueError, match=message):
        service_env(model, **values)


def test_service_env_leaves_combinations_to_the_model():
    # model validators relate several settings that may come from elsewhere; one value alone passes
    assert service_env(MinerSettings, delay_grad_averaging=True) == {"HIVE_DELAY_GRAD_AVERAGING": "true"}


def test_diloco_averages_parameters_every_few_outer_steps_unless_told():
    from hivetrain.settings import DILOCO_AVERAGE_STATE_EVERY

    assert MinerSettings(mode="diloco").average_state_every == DILOCO_AVERAGE_STATE_EVERY > 1
    assert MinerSettings(mode="diloco", average_state_every=1).average_state_every == 1
    assert MinerSettings().average_state_every == 1  # gradient averaging keeps hivemind's every epoch


def test_diloco_refuses_the_other_modes_switches_with_the_fix():
    with pytest.raises(ValueError, match="unset HIVE_USE_LOCAL_UPDATES"):
        MinerSettings(mode="diloco", use_local_updates=True)
