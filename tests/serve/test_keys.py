"""API keys without a server: ``embedpipe keys add/list/remove``, the key file (hashes
only, 0600), the key variable's format, the key ring's checks and reloads, and the
decision whether an address may be served."""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from pathlib import Path

import pytest

from conftest import cli, write_config
from embedpipe.config import load_settings
from embedpipe.errors import AuthenticationRequired, ConfigError, KeyFileInvalid
from embedpipe.serve import keys as keys_module
from embedpipe.serve.keys import KeyRing, add_key, parse_env, read_key_file, remove_key
from embedpipe.serve.runner import check_host

KEY = re.compile(r"^ep_[A-Za-z0-9_-]{43}$")


def _add(capsys, monkeypatch, config: Path, *args: str) -> str:
    code, out, err = cli(capsys, monkeypatch, "-c", str(config), "keys", "add", *args)
    assert code == 0, err
    return out


def test_keys_add_prints_the_key_once_and_keeps_only_its_hash(tmp_path, capsys, monkeypatch) -> None:
    config = write_config(tmp_path)
    out = _add(capsys, monkeypatch, config, "reader", "--index", "docs", "-i", "faq", "--scope", "read")
    key = out.strip()
    assert out.count("\n") == 1 and KEY.match(key), out  # stdout is the key alone
    path = tmp_path / "data" / "keys.toml"
    text = path.read_text()
    assert key not in text and hashlib.sha256(key.encode()).hexdigest() in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    (entry,) = read_key_file(path)
    assert (entry.name, entry.indexes, entry.scopes) == ("reader", ("docs", "faq"), ("read",))
    assert entry.sha256 == hashlib.sha256(key.encode()).hexdigest() and entry.created
    second = _add(capsys, monkeypatch, config, "ops", "-i", "*", "-s", "chat,write", "-s", "read").strip()
    assert second != key and text.count("# API keys") == path.read_text().count("# API keys") == 1
    assert [(k.name, k.indexes, k.scopes) for k in read_key_file(path)] == [
        ("reader", ("docs", "faq"), ("read",)), ("ops", ("*",), ("read", "write", "chat"))]


def test_keys_add_json_list_and_remove(tmp_path, capsys, monkeypatch) -> None:
    config = write_config(tmp_path, '[server]\nrate_limit_per_minute = 60\n[server.rate_limits]\napp = 5\n')
    made = json.loads(_add(capsys, monkeypatch, config, "app", "-i", "docs", "-s", "read", "--json"))
    assert KEY.match(made["key"]) and made["sha256"] == hashlib.sha256(made["key"].encode()).hexdigest()
    _add(capsys, monkeypatch, config, "other", "-i", "docs", "-s", "write")
    code, out, err = cli(capsys, monkeypatch, "-c", str(config), "keys", "list", "--json")
    assert code == 0 and made["key"] not in out
    listed = json.loads(out)
    assert [(k["name"], k["sha256_prefix"], k["rate_limit_per_minute"]) for k in listed] == [
        ("app", made["sha256"][:12], 5), ("other", listed[1]["sha256_prefix"], 60)]
    code, out, err = cli(capsys, monkeypatch, "-c", str(config), "keys", "remove", "app")
    assert code == 0 and "removed key 'app'" in err
    path = tmp_path / "data" / "keys.toml"
    assert [k.name for k in read_key_file(path)] == ["other"] and stat.S_IMODE(path.stat().st_mode) == 0o600
    code, out, err = cli(capsys, monkeypatch, "-c", str(config), "keys", "remove", "app")
    assert code == 2 and err == f"error: no key named 'app' in {path}; its keys: other\n"


@pytest.mark.parametrize("args, message", [
    (["reader", "-i", "docs", "-s", "read"], "a key named 'reader' is already in"),
    (["new", "-s", "read"], "name the indexes the key may use"),
    (["new", "-i", "docs"], "name what the key may do: --scope read"),
    (["new", "-i", "docs", "-s", "admin"], "--scope: unknown scope 'admin'; scopes are read, write, chat"),
    (["new", "-i", "a__b", "-s", "read"], "--index: invalid index name 'a__b'"),
    (["bad name", "-i", "docs", "-s", "read"], "key name 'bad name' is not valid"),
])
def test_keys_add_refuses_in_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch, args, message) -> None:
    config = write_config(tmp_path)
    _add(capsys, monkeypatch, config, "reader", "-i", "docs", "-s", "read")
    before = (tmp_path / "data" / "keys.toml").read_bytes()
    code, out, err = cli(capsys, monkeypatch, "-c", str(config), "keys", "add", *args)
    assert code == 2 and out == "" and err.startswith("error: ") and message in err and err.count("\n") == 1
    assert (tmp_path / "data" / "keys.toml").read_bytes() == before


def test_keys_add_env_prints_an_entry_and_writes_nothing(tmp_path, capsys, monkeypatch) -> None:
    config = write_config(tmp_path)
    entry = _add(capsys, monkeypatch, config, "app", "-i", "docs,faq", "-s", "write", "-s", "read", "--env").strip()
    name, scopes, indexes, key = entry.split(":")
    assert (name, scopes, indexes) == ("app", "read,write", "docs,faq") and KEY.match(key)
    assert not (tmp_path / "data").exists()
    (parsed,) = parse_env(entry, "EMBEDPIPE_SERVER_KEYS")
    assert parsed.sha256 == hashlib.sha256(key.encode()).hexdigest() and parsed.scopes == ("read", "write")


def test_an_existing_key_file_is_made_private(tmp_path) -> None:
    path = tmp_path / "keys.toml"
    path.write_text("")
    os.chmod(path, 0o644)
    add_key(path, "app", ["*"], ["read"])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize("entry, message", [
    ('name = "a"\nkey = "ep_in_clear_0123456789"\nsha256 = "{h}"\nindexes = ["*"]\nscopes = ["read"]',
     "holds a key in clear"),
    ('name = "a"\nsha256 = "abc"\nindexes = ["*"]\nscopes = ["read"]', "sha256 must be 64 lowercase hex digits"),
    ('name = "a"\nsha256 = "{h}"\nindexes = ["*"]\nscopes = ["admin"]', "unknown scope 'admin'"),
    ('name = "a"\nsha256 = "{h}"\nindexes = []\nscopes = ["read"]', "no index"),
    ('name = "a"\nsha256 = "{h}"\nindexes = "docs"\nscopes = ["read"]', "indexes must be a list of strings"),
    ('name = "a"\nsha256 = "{h}"\nindexes = ["*"]\nscopes = ["read"]\nrole = "x"', "unknown field 'role'"),
])
def test_an_invalid_key_file_names_the_entry_and_the_fix(tmp_path, entry, message) -> None:
    path = tmp_path / "keys.toml"
    path.write_text("[[keys]]\n" + entry.replace("{h}", "0" * 64) + "\n")
    with pytest.raises(KeyFileInvalid, match=re.escape(message)) as caught:
        read_key_file(path)
    assert "ep_in_clear" not in str(caught.value)


def test_a_key_file_with_a_name_or_key_twice_is_refused(tmp_path) -> None:
    path = tmp_path / "keys.toml"
    add_key(path, "a", ["*"], ["read"])
    entry = path.read_text().split("[[keys]]")[1]
    path.write_text(path.read_text() + "[[keys]]" + entry)
    with pytest.raises(KeyFileInvalid, match="two keys are named 'a'"):
        read_key_file(path)
    path.write_text(path.read_text().replace('name = "a"', 'name = "b"', 1))
    with pytest.raises(KeyFileInvalid, match="keys 'b' and 'a' are the same key"):
        read_key_file(path)


def test_the_key_variable_format() -> None:
    value = ("app:read,write:docs,faq:ep_0123456789abcdefXYZ; ops:chat:*:s3cret-s3cret-s3cret\n"
             "  odd:read:docs:has:colons:inside  ")
    app, ops, odd = parse_env(value, "EMBEDPIPE_SERVER_KEYS")
    assert (app.name, app.scopes, app.indexes) == ("app", ("read", "write"), ("docs", "faq"))
    assert (ops.indexes, ops.scopes, ops.source) == (("*",), ("chat",), "$EMBEDPIPE_SERVER_KEYS")
    assert odd.sha256 == hashlib.sha256(b"has:colons:inside").hexdigest()


@pytest.mark.parametrize("value, message", [
    ("ep_just_a_key_0123456789", "entry 1 is not NAME:SCOPES:INDEXES:KEY"),
    ("a:read:docs:ep_0123456789abcdef;b:read:docs", "entry 2 is not NAME:SCOPES:INDEXES:KEY"),
    ("a:read:docs:short", "key 'a': the key must be 16 to 512 ASCII characters"),
    ("a:admin:docs:ep_0123456789abcdef", "key 'a': unknown scope 'admin'"),
    ("a:read:a__b:ep_0123456789abcdef", "invalid index name 'a__b'"),
])
def test_a_malformed_key_variable_names_the_entry_never_the_key(value, message) -> None:
    with pytest.raises(KeyFileInvalid, match=re.escape(message)) as caught:
        parse_env(value, "EMBEDPIPE_SERVER_KEYS")
    assert "0123456789" not in str(caught.value) and "short" not in str(caught.value)


def _ring(tmp_path: Path, body: str = "", env: dict[str, str] | None = None) -> KeyRing:
    return KeyRing(load_settings(write_config(tmp_path, body), env=env or {}))


def test_every_known_hash_is_compared_in_constant_time(tmp_path, monkeypatch) -> None:
    path = tmp_path / "data" / "keys.toml"
    made = [add_key(path, name, ["*"], ["read"])[0] for name in ("a", "b", "c")]
    ring = _ring(tmp_path, env={"EMBEDPIPE_SERVER_KEYS": "d:read:*:ep_0123456789abcdef"})
    calls: list[tuple[str, str]] = []
    real = keys_module.hmac.compare_digest

    def counted(a: str, b: str) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(keys_module.hmac, "compare_digest", counted)
    for presented in (made[0], made[2], "ep_0123456789abcdef"):
        calls.clear()
        assert ring.identify(f"Bearer {presented}").sha256 == hashlib.sha256(presented.encode()).hexdigest()
        assert len(calls) == 4  # all four keys, whichever matched, and never the key itself
        assert all(presented not in pair for pair in calls)
    calls.clear()
    with pytest.raises(AuthenticationRequired, match="unknown API key"):
        ring.identify("Bearer ep_not_a_key_at_all_0000")
    assert len(calls) == 4


@pytest.mark.parametrize("header, message", [
    (None, "this server needs an API key: send 'Authorization: Bearer <key>'"),
    ("", "this server needs an API key"),
    ("Basic dXNlcjpwYXNz", "must be 'Bearer <key>'"),
    ("Bearer", "must be 'Bearer <key>'"),
    ("Bearer " + "x" * 5000, "unknown API key"),
])
def test_a_missing_or_malformed_header_is_refused(tmp_path, header, message) -> None:
    add_key(tmp_path / "data" / "keys.toml", "a", ["*"], ["read"])
    with pytest.raises(AuthenticationRequired, match=re.escape(message)):
        _ring(tmp_path).identify(header)


def test_the_ring_reloads_the_file_and_never_falls_open(tmp_path) -> None:
    path = tmp_path / "data" / "keys.toml"
    first, _ = add_key(path, "first", ["*"], ["read"])
    ring = _ring(tmp_path, env={"EMBEDPIPE_SERVER_KEYS": "envkey:read:*:ep_0123456789abcdef"})
    assert ring.required and ring.identify(f"Bearer {first}").name == "first"
    second, _ = add_key(path, "second", ["docs"], ["write"])
    assert ring.identify(f"bearer {second}").name == "second"  # the scheme is case-insensitive
    remove_key(path, "first")
    with pytest.raises(AuthenticationRequired, match="unknown API key"):
        ring.identify(f"Bearer {first}")
    path.write_text(path.read_text() + "[[keys]]\nname = 'broken'\n")  # a hand edit gone wrong
    with pytest.raises(KeyFileInvalid, match="key file is invalid"):
        ring.identify(f"Bearer {second}")  # refused, not kept: the edit may have been a revocation
    assert ring.identify("Bearer ep_0123456789abcdef").name == "envkey"  # the variable's keys still work
    path.write_text(path.read_text().replace("[[keys]]\nname = 'broken'\n", ""))
    assert ring.identify(f"Bearer {second}").name == "second"
    remove_key(path, "second")
    ring.refresh()
    assert ring.required and [k.name for k in ring.keys()] == ["envkey"]  # still asks for a key


def test_a_server_with_no_keys_is_open_and_one_with_keys_is_not(tmp_path) -> None:
    assert not _ring(tmp_path).required
    assert "no API keys" in _ring(tmp_path).describe()
    add_key(tmp_path / "data" / "keys.toml", "a", ["*"], ["read"])
    ring = _ring(tmp_path)
    assert ring.required and "a " in ring.describe() and "/healthz" in ring.describe()


def test_the_ring_refuses_what_cannot_be_right(tmp_path) -> None:
    path = tmp_path / "data" / "keys.toml"
    add_key(path, "a", ["*"], ["read"])
    with pytest.raises(KeyFileInvalid, match="two keys are named 'a'"):
        _ring(tmp_path, env={"EMBEDPIPE_SERVER_KEYS": "a:read:*:ep_0123456789abcdef"})
    with pytest.raises(ConfigError, match="server.rate_limits names 'b', which is no key's name"):
        _ring(tmp_path, "[server.rate_limits]\nb = 3\n")
    with pytest.raises(KeyFileInvalid, match="does not exist; make it with `embedpipe keys add"):
        _ring(tmp_path, '[server]\nkey_file = "elsewhere.toml"\n')


@pytest.mark.parametrize("host, keyed, allowed", [
    ("127.0.0.1", False, True), ("localhost", False, True), ("::1", False, True),
    ("0.0.0.0", False, False), ("::", False, False),
    ("0.0.0.0", True, True), ("127.0.0.1", True, True),
])
def test_which_address_may_be_served(tmp_path, host, keyed, allowed) -> None:
    settings = load_settings(write_config(tmp_path))
    if allowed:
        check_host(host, keyed, settings)
        return
    with pytest.raises(ConfigError, match=f"--host {re.escape(host)} is not loopback, and listening there "
                                          "needs API keys: add one with `embedpipe keys add"):
        check_host(host, keyed, settings)
