"""Settings: where the file is found, environment overrides, secrets kept out."""

from __future__ import annotations

from pathlib import Path

import pytest

from embedpipe.config import find_config, load_settings
from embedpipe.errors import ConfigError

from conftest import write_config


def test_defaults_without_a_config_file(tmp_path: Path) -> None:
    settings = load_settings()
    assert settings.config_path is None
    assert settings.data_dir == (tmp_path / ".embedpipe").resolve()
    assert settings.default_profile == "local-minilm"


def test_config_is_found_like_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    local = write_config(tmp_path)
    assert find_config() == local
    other = tmp_path / "elsewhere"
    other.mkdir()
    env_config = write_config(other)
    monkeypatch.setenv("EMBEDPIPE_CONFIG", str(env_config))
    assert find_config() == env_config
    assert find_config(local) == local  # an explicit path wins


def test_data_dir_is_relative_to_the_config_file(tmp_path: Path, monkeypatch) -> None:
    sub = tmp_path / "proj"
    sub.mkdir()
    config = write_config(sub)
    monkeypatch.chdir(tmp_path)
    assert load_settings(config).data_dir == (sub / "data").resolve()


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    config = write_config(tmp_path, 'default_profile = "local-bge"\n')
    env = {"EMBEDPIPE_DEFAULT_PROFILE": "local-minilm", "EMBEDPIPE_QDRANT_URL": "http://127.0.0.1:1",
           "EMBEDPIPE_QDRANT_API_KEY": "sk-qdrant-secret"}
    settings = load_settings(config, env=env)
    assert settings.default_profile == "local-minilm"
    assert settings.qdrant.url == "http://127.0.0.1:1"
    assert settings.qdrant.api_key.get_secret_value() == "sk-qdrant-secret"
    assert "sk-qdrant-secret" not in repr(settings)
    assert "sk-qdrant-secret" not in settings.model_dump_json()


def test_api_key_in_the_file_is_refused(tmp_path: Path) -> None:
    config = write_config(tmp_path, '[qdrant]\napi_key = "oops"\n')
    with pytest.raises(ConfigError, match="EMBEDPIPE_QDRANT_API_KEY"):
        load_settings(config)


@pytest.mark.parametrize(
    "body, match",
    [
        ("data_dir = [\n", "invalid TOML"),
        ('default_profile = "nope"\n', "unknown profile 'nope'"),
        ("no_such_key = 1\n", "no_such_key"),
        ('device = "tpu"\n', "device"),
        ("[server]\nmax_k = 0\n", "server.max_k: Input should be greater than 0"),
        ("[server]\nport = 70000\n", "server.port"),
        ("[server]\nworkers = 4\n", "server.workers"),
        ("[server]\nrate_limit_per_minute = -1\n", "server.rate_limit_per_minute: Input should be greater than or equal to 0"),
        ("[server.rate_limits]\napp = -5\n", "server.rate_limits.app"),
        ('[server.rate_limits]\n"no spaces" = 5\n', "rate_limits: 'no spaces' is not a key name"),
        ('[server]\nkeys_env = "MY KEYS"\n', "server.keys_env"),
        ("[server]\nshutdown_wait_s = 0\n", "server.shutdown_wait_s: Input should be greater than 0"),
    ],
)
def test_bad_config_is_one_clear_error(tmp_path: Path, body: str, match: str) -> None:
    config = tmp_path / "embedpipe.toml"
    config.write_text(body)
    with pytest.raises(ConfigError, match=match):
        load_settings(config)


def test_server_settings_and_their_defaults(tmp_path: Path) -> None:
    defaults = load_settings(write_config(tmp_path)).server
    assert (defaults.host, defaults.port, defaults.max_k, defaults.max_batch) == ("127.0.0.1", 8765, 1000, 2048)
    assert defaults.max_body_bytes == 32 * 2**20 and defaults.write_wait_s == 30
    assert defaults.shutdown_wait_s == 25
    body = ("[server]\nport = 0\nmax_body_bytes = 1024\nmax_batch = 10\nmax_k = 5\nwrite_wait_s = 0\n"
            "shutdown_wait_s = 2.5\n")
    server = load_settings(write_config(tmp_path, body)).server
    assert (server.port, server.max_body_bytes, server.max_batch, server.max_k, server.write_wait_s,
            server.shutdown_wait_s) == (0, 1024, 10, 5, 0, 2.5)


def test_server_access_settings(tmp_path: Path) -> None:
    defaults = load_settings(write_config(tmp_path))
    assert defaults.key_file == tmp_path / "data" / "keys.toml" and defaults.server.key_file is None
    assert defaults.server.keys_env == "EMBEDPIPE_SERVER_KEYS" and defaults.server.env_keys is None
    assert defaults.server.rate_limit_per_minute == 0 and defaults.server.rate_limit_of("any") == 0
    body = ('[server]\nkey_file = "secrets/keys.toml"\nkeys_env = "APP_KEYS"\nrate_limit_per_minute = 60\n'
            "[server.rate_limits]\nbatch-job = 600\nunlimited = 0\n")
    settings = load_settings(write_config(tmp_path, body), env={"APP_KEYS": "app:read:*:ep_0123456789abcdef"})
    server = settings.server
    assert settings.key_file == tmp_path / "secrets" / "keys.toml"  # relative to the config file
    assert server.rate_limit_of("batch-job") == 600 and server.rate_limit_of("unlimited") == 0
    assert server.rate_limit_of("app") == 60
    assert server.env_keys is not None and server.env_keys.get_secret_value() == "app:read:*:ep_0123456789abcdef"
    assert "ep_0123" not in repr(settings) and "ep_0123" not in str(settings.model_dump())
    unread = load_settings(write_config(tmp_path, body), env={"EMBEDPIPE_SERVER_KEYS": "x:read:*:ep_0123456789abcdef"})
    assert unread.server.env_keys is None  # only the variable keys_env names


@pytest.mark.parametrize("field", ["keys", "api_keys", "api_key", "env_keys"])
def test_server_keys_in_the_config_file_are_refused(tmp_path: Path, field: str) -> None:
    config = write_config(tmp_path, f'[server]\n{field} = "ep_0123456789abcdef"\n')
    with pytest.raises(ConfigError, match=f"do not put server.{field} in the config file.*embedpipe keys add"):
        load_settings(config)


@pytest.mark.parametrize("value", ["1", '""', "[]"])
def test_a_key_file_that_is_not_a_path_is_refused(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match="server.key_file must be a file path"):
        load_settings(write_config(tmp_path, f"[server]\nkey_file = {value}\n"))


def test_missing_explicit_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")


@pytest.mark.parametrize(
    "body, match",
    [
        ("data_dir = 5\n", "data_dir must be a string"),
        ('qdrant = "x"\n', "qdrant must be a table"),
        ("profiles = 3\n", "profiles must be a table of tables"),
        ('[profiles]\nfoo = "x"\n', "profiles.foo must be a table"),
        ('[indexes]\nkb = 1\n', "indexes.kb must be a table"),
        ("[qdrant]\npath = 1\n", "qdrant.path must be a string"),
        ('server = "x"\n', "server must be a table"),
        ("[profiles.local-minilm]\npath = 1\n", "path must be a string"),
    ],
)
def test_wrong_shapes_are_config_errors(tmp_path: Path, body: str, match: str) -> None:
    path = tmp_path / "embedpipe.toml"
    path.write_text(body, encoding="utf-8")
    with pytest.raises(ConfigError, match=match):
        load_settings(path)


def test_key_fields_default_to_no_key_for_a_base_url(tmp_path: Path) -> None:
    config = write_config(tmp_path, (
        '[chat]\nroute = ["own"]\n[chat.backends.own]\nbase_url = "http://127.0.0.1:8000/v1"\n'
        'model = "m"\nhosted = false\n[qdrant]\nallow_insecure_key = true\n'
        '[profiles.tei]\nprovider = "openai"\nmodel = "bge"\ndims = 384\n'
        'base_url = "http://gpu.internal/v1"\nallow_insecure_key = true\n'
        'replicas = [{ base_url = "http://gpu-2.internal/v1", allow_insecure_key = true }]\n'))
    settings = load_settings(config)
    assert settings.chat.backends["own"].api_key_env is None  # no $OPENAI_API_KEY by default
    assert settings.profile("tei").api_key_env is None
    assert settings.profile("tei").replicas[0].api_key_env is None  # never inherited
    assert settings.qdrant.allow_insecure_key and settings.profile("tei").allow_insecure_key
