"""Settings: the TOML file, TRACKPIPE_<SECTION>_<KEY> overrides, CLI flags, and the README."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import httpx
import msgspec
import pytest

from support import free_port
from trackpipe import config
from trackpipe.config import Settings
from trackpipe.errors import ConfigError

README = Path(__file__).resolve().parents[1] / "README.md"


def section_types() -> dict[str, type]:
    info = msgspec.inspect.type_info(Settings)
    return {f.name: f.type.cls for f in info.fields
            if isinstance(f.type, msgspec.inspect.StructType)}


def readme_config_block() -> str:
    text = README.read_text()
    section = text.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```toml\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "README's Configuration section should hold one TOML block"
    return blocks[0]


def write(tmp_path: Path, text: str, name: str = "trackpipe.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# -- loading ---------------------------------------------------------------------


def test_defaults_without_file_or_env():
    s = config.load(env={})
    assert s == Settings()
    assert (s.data_dir, s.admin_token) == ("./trackpipe-data", "")
    assert (s.server.host, s.server.port, s.server.cors_origins) == ("127.0.0.1", 8080, ["*"])
    assert s.limits.max_event_bytes == 32 * 1024


def test_file_values_are_read(tmp_path):
    path = write(tmp_path, """
data_dir = "/srv/tp"
[server]
port = 9999
trusted_proxies = ["10.0.0.0/8"]
[limits]
max_batch_events = 10
[dedup]
window_seconds = 60
[ingest]
strict = true
""")
    s = config.load(path, env={})
    assert s.data_dir == "/srv/tp" and s.data_path == Path("/srv/tp")
    assert s.server.port == 9999 and s.server.host == "127.0.0.1"
    assert s.server.trusted_proxies == ["10.0.0.0/8"]
    assert s.limits.max_batch_events == 10 and s.limits.max_event_bytes == 32768
    assert s.dedup.window_seconds == 60
    assert s.ingest.strict is True and s.ingest.version == 2


@pytest.mark.parametrize("text, key", [
    ("bogus_key = 1\n", "bogus_key"),
    ("[limits]\nmax_event_bytez = 10\n", "max_event_bytez"),
    ("[server]\nport = 1\nlisten = 'x'\n", "listen"),
    ("[storage]\npath = 'x'\n", "storage"),
])
def test_unknown_key_is_an_error_that_names_it(tmp_path, key, text):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        config.load(path, env={})
    assert key in str(exc.value)
    assert str(path) in str(exc.value)


@pytest.mark.parametrize("text, listed, section", [
    ("[server]\nprot = 8081\n", "Valid keys in [server] are host, port,", "server"),
    ("[limits]\nmax_event_bytez = 10\n", "Valid keys in [limits] are", "limits"),
    ("prot = 8081\n", "Valid top-level keys are data_dir, admin_token, server,", None),
    ("[[destinations]]\nname = 'a'\ntyp = 'file'\n",
     "Valid keys in [[destinations]] are name, type, enabled,", "destinations"),
    ("[[destinations]]\nname = 'a'\ntype = 'file'\n[destinations.filter]\nmod = 'x'\n",
     "Valid keys in [destinations.filter] are mode, types, events.", "destinations.filter"),
])
def test_an_unknown_key_lists_the_keys_valid_where_it_is(tmp_path, text, listed, section):
    with pytest.raises(ConfigError) as exc:
        config.load(write(tmp_path, text), env={})
    assert listed in str(exc.value)
    if section:
        fields = config._TABLES[section].__struct_fields__
        assert ", ".join(fields) in str(exc.value)
        assert "Valid top-level keys" not in str(exc.value)


def test_a_wrong_type_lists_no_keys(tmp_path):
    with pytest.raises(ConfigError) as exc:
        config.load(write(tmp_path, "[server]\nport = 'x'\n"), env={})
    assert "Expected `int`, got `str` - at `$.server.port`" in str(exc.value)
    assert "Valid" not in str(exc.value) and "See README.md#configuration." in str(exc.value)


def test_a_list_kept_beside_its_tables_says_which_line_to_delete(tmp_path):
    # The README's example sets `destinations = []`; adding [[destinations]] below it
    # is a TOML error whose own text ("Cannot mutate immutable namespace") says little.
    path = write(tmp_path, readme_config_block() + "\n[[destinations]]\nname = 'f'\n"
                                                   "type = 'file'\n")
    with pytest.raises(ConfigError) as exc:
        config.load(path, env={})
    assert "not valid TOML" in str(exc.value)
    assert "delete the `destinations = ...` line to use the tables" in str(exc.value)


def test_wrong_type_missing_file_and_bad_toml_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="port"):
        config.load(write(tmp_path, "[server]\nport = 'eighty'\n"), env={})
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "missing.toml", env={})
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(write(tmp_path, "[server\n"), env={})


def deeply_nested_mapping(depth: int) -> str:
    return "mapping = { x = " + "{a=" * depth + "1" + "}" * depth + " }\n"


def test_tables_nested_past_what_tomllib_can_read_are_a_configuration_error(tmp_path):
    # tomllib recurses once per level: this was a RecursionError traceback
    path = write(tmp_path, "[[destinations]]\nname = 'f'\ntype = 'file'\n"
                           "[[destinations.actions]]\nname = 'a'\ntrigger = 'true'\n"
                           + deeply_nested_mapping(1000))
    with pytest.raises(ConfigError) as exc:
        config.load(path, env={})
    assert str(exc.value) == (f"Invalid configuration in {path}: inline tables or arrays nest"
                              " too deeply to be read; no setting needs more than a few levels.")


def test_an_env_value_nested_past_what_tomllib_can_read_is_a_string():
    with pytest.raises(ConfigError, match="cors_origins"):  # a string, where a list belongs
        config.load(env={"TRACKPIPE_SERVER_CORS_ORIGINS": "[" * 1000 + "]" * 1000})


@pytest.mark.parametrize("text, keys", [
    ("[[destination]]\nname = 'w'\ntype = 'file'\n",  # a typo of destinations
     Settings.__struct_fields__),
    ("[[destinations]]\nname = 'w'\ntype = 'file'\nbatchsize = 5\n",  # an error inside
     config.Destination.__struct_fields__),
])
def test_the_error_hint_lists_every_key_valid_there_destinations_too(tmp_path, text, keys):
    with pytest.raises(ConfigError) as exc:
        config.load(write(tmp_path, text), env={})
    hint = re.search(r"Valid [][a-z -]+ are ([^.]+)\.", str(exc.value))
    assert hint, str(exc.value)
    assert hint[1].split(", ") == list(keys)


@pytest.mark.parametrize("text, key", [
    # NaN reached the consumers process as JSON null: it crash-looped while /ready said ok
    ("[limits]\nrate_limit_burst_seconds = nan\n", "rate_limit_burst_seconds"),
    ("[limits]\nrate_limit_events_per_second = inf\n", "rate_limit_events_per_second"),
    ("[limits]\nmax_request_bytes = -1\n", "max_request_bytes"),
    ("[log]\nprune_every_seconds = nan\n", "prune_every_seconds"),
    ("[server]\nport = 99999\n", "port"),
    ("[server]\nport = 0\n", "port"),
    ("[[destinations]]\nname = 'w'\ntype = 'file'\nretry_initial_seconds = nan\n",
     "retry_initial_seconds"),
    ("[[destinations]]\nname = 'w'\ntype = 'file'\nretry_max_delay_seconds = -inf\n",
     "retry_max_delay_seconds"),
])
def test_nan_infinite_and_out_of_range_numbers_are_errors(tmp_path, text, key):
    with pytest.raises(ConfigError, match=key):
        config.load(write(tmp_path, text), env={})


@pytest.mark.parametrize("public_url", [
    "example.com:8443",        # no scheme: the settings body said protocol "example.com"
    "ftp://example.com", "https://", "https://example.com/?a=1", "https://example.com/#x",
])
def test_a_public_url_the_browser_settings_cannot_use_is_an_error(public_url):
    with pytest.raises(ConfigError, match="public_url"):
        config.load(env={"TRACKPIPE_SERVER_PUBLIC_URL": public_url})


@pytest.mark.parametrize("public_url", ["https://t.example.com", "http://10.0.0.5:8080",
                                        "https://example.com/trackpipe/"])
def test_public_urls_with_a_host_and_maybe_a_path_are_fine(public_url):
    assert config.load(env={"TRACKPIPE_SERVER_PUBLIC_URL": public_url}).server.public_url


def test_a_trusted_proxy_that_is_no_address_is_an_error_not_a_traceback_at_start():
    with pytest.raises(ConfigError, match="'bogus' is not an IP address or CIDR"):
        config.load(env={"TRACKPIPE_SERVER_TRUSTED_PROXIES": '["10.0.0.0/8", "bogus"]'})


@pytest.mark.parametrize("token", ["pässwort", " padded ", "tab\tinside"])
def test_admin_token_that_no_http_header_can_carry_is_an_error(token):
    with pytest.raises(ConfigError, match="admin_token"):
        config.load(env={"TRACKPIPE_ADMIN_TOKEN": token})


@pytest.mark.parametrize("name", ["user_id", "anonymous_id", "profile"])
def test_a_trait_identifier_named_like_a_kind_of_identifier_is_an_error(name):
    # its trait values would pass for userIds (anonymousIds, profile ids) of other people
    with pytest.raises(ConfigError, match=f"identity.trait_identifiers cannot hold '{name}'"):
        config.load(env={"TRACKPIPE_IDENTITY_TRAIT_IDENTIFIERS": f'["email", "{name}"]'})


def test_check_refuses_a_trait_identifier_named_user_id(tmp_path):
    path = write(tmp_path, '[identity]\ntrait_identifiers = ["user_id"]\n')
    r = trackpipe("check", "--config", str(path), "--data-dir", str(tmp_path / "data"))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "identity.trait_identifiers cannot hold 'user_id'" in r.stderr
    assert "user_id, anonymous_id, profile are reserved" in r.stderr


def test_unreadable_config_files_are_errors(tmp_path):
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe[server]\n")
    with pytest.raises(ConfigError, match="cannot be read"):
        config.load(binary, env={})
    with pytest.raises(ConfigError, match="cannot be read"):
        config.load(tmp_path, env={})  # a directory


def test_a_data_dir_that_is_a_file_is_an_error(tmp_path):
    (tmp_path / "afile").write_text("")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        config.make_data_dir(tmp_path / "afile")
    with pytest.raises(ConfigError, match="data dir"):
        config.make_data_dir(tmp_path / "afile" / "below")


@pytest.mark.parametrize("value", [-1, 20])
def test_consumers_nice_outside_0_to_19_is_an_error(tmp_path, value):
    with pytest.raises(ConfigError, match="consumers_nice"):
        config.load(write(tmp_path, f"[server]\nconsumers_nice = {value}\n"), env={})


@pytest.mark.parametrize("text, key", [
    ("[server]\nidle_timeout_seconds = 0\n", "idle_timeout_seconds"),
    ("[server]\nheader_timeout_seconds = nan\n", "header_timeout_seconds"),
    ("[server]\nbody_timeout_seconds = -1\n", "body_timeout_seconds"),
    ("[server]\nmax_header_bytes = 100\n", "max_header_bytes"),  # not even a request line
    ("[server]\nmax_connections = -1\n", "max_connections"),
])
def test_http_deadlines_and_limits_out_of_range_are_errors(tmp_path, text, key):
    with pytest.raises(ConfigError, match=key):
        config.load(write(tmp_path, text), env={})


@pytest.mark.parametrize("soft, cap", [(1024, 896), (20000, 19872), (256, 128), (64, 32)])
def test_max_connections_0_is_the_open_file_limit_less_a_reserve(monkeypatch, soft, cap):
    import resource

    monkeypatch.setattr(resource, "getrlimit", lambda which: (soft, soft))
    assert config.load(env={}).server.connection_limit() == cap
    assert config.load(env={"TRACKPIPE_SERVER_MAX_CONNECTIONS": "7"}).server \
        .connection_limit() == 7


# -- environment -----------------------------------------------------------------


def test_env_overrides_with_typed_values_and_wins_over_the_file(tmp_path):
    path = write(tmp_path, "data_dir = 'from-file'\n[limits]\nmax_event_bytes = 100000\n"
                           "[server]\nport = 1111\n")
    s = config.load(path, env={
        "TRACKPIPE_LIMITS_MAX_EVENT_BYTES": "65536",
        "TRACKPIPE_SERVER_TRUSTED_PROXIES": '["127.0.0.1", "10.0.0.0/8"]',
        "TRACKPIPE_SERVER_PUBLIC_URL": "https://t.example.com",
        "TRACKPIPE_INGEST_STRICT": "true",
        "TRACKPIPE_DEDUP_WINDOW_SECONDS": "60",
        "TRACKPIPE_DATA_DIR": "/from/env",
        "TRACKPIPE_ADMIN_TOKEN": "123",  # kept as a string, never parsed
        "PATH": "/usr/bin",
    })
    assert s.limits.max_event_bytes == 65536
    assert s.server.port == 1111  # the file still applies where the env is silent
    assert s.server.trusted_proxies == ["127.0.0.1", "10.0.0.0/8"]
    assert s.server.public_url == "https://t.example.com"
    assert s.ingest.strict is True
    assert s.dedup.window_seconds == 60
    assert s.data_dir == "/from/env"
    assert s.admin_token == "123"


def all_settings() -> list[tuple[str, str]]:
    return [(section, field) for section, cls in section_types().items()
            for field in cls.__struct_fields__]


@pytest.mark.parametrize("section, field", all_settings())
def test_every_setting_has_an_env_variable(section, field, capsys):
    default = getattr(getattr(Settings(), section), field)
    name = f"TRACKPIPE_{section.upper()}_{field.upper()}"
    s = config.load(env={name: json.dumps(default)})  # JSON scalars/arrays are valid TOML
    assert getattr(getattr(s, section), field) == default
    assert "ignoring" not in capsys.readouterr().err


def test_unknown_env_variable_is_ignored_with_a_warning(capsys):
    s = config.load(env={"TRACKPIPE_LIMITS_MAX_EVENTS": "5", "TRACKPIPE_REQUIRE_SERVICES": "1"})
    assert s == Settings()
    err = capsys.readouterr().err
    assert "TRACKPIPE_LIMITS_MAX_EVENTS" in err
    assert "TRACKPIPE_REQUIRE_SERVICES" not in err


# -- the CLI ---------------------------------------------------------------------


def trackpipe(command: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("TRACKPIPE_")}
    return subprocess.run([sys.executable, "-m", "trackpipe", command, *args],
                          capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
                          env={**base, **(env or {})})


def serve(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return trackpipe("serve", *args, env=env)


def test_serve_with_unknown_config_key_exits_2_and_names_it(tmp_path):
    data = tmp_path / "data"
    bad = write(tmp_path, "[limits]\nmax_event_bytes = 2000\nmax_evnt_bytes = 5\n", "bad.toml")
    r = serve("--config", str(bad), "--port", str(free_port()), "--data-dir", str(data))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "max_evnt_bytes" in r.stderr and "bad.toml" in r.stderr
    assert r.stderr.startswith("trackpipe: ")
    assert r.stdout == ""
    assert not data.exists()  # nothing was created for a configuration that does not load

    r = serve("--config", str(tmp_path / "nope.toml"), "--data-dir", str(data))
    assert r.returncode == 2 and "nope.toml" in r.stderr


DEEP_MAPPING_KEY = ".".join(["a"] * 600)


@pytest.mark.parametrize("mapping, words", [
    # tomllib's RecursionError was a traceback at start
    (deeply_nested_mapping(1000), "Invalid configuration in {path}: inline tables or arrays"
                                  " nest too deeply to be read"),
    # so was compiling an output 600 levels deep (docs/routing.md: at most 32)
    (f'mapping = {{ "{DEEP_MAPPING_KEY}" = "$.userId" }}\n',
     "Destination 'f', action 'a': bad mapping. Mapping key 'a.a.a."),
])
@pytest.mark.parametrize("command", ["check", "serve"])
def test_check_and_serve_refuse_a_mapping_nested_too_deep_in_one_line(tmp_path, command,
                                                                        mapping, words):
    data = tmp_path / "data"
    path = write(tmp_path, "[[destinations]]\nname = 'f'\ntype = 'file'\n"
                           f"settings = {{ directory = '{tmp_path / 'out'}' }}\n"
                           "[[destinations.actions]]\nname = 'a'\ntrigger = 'true'\n"
                           + mapping, "deep.toml")
    args = ["--port", str(free_port())] if command == "serve" else []
    r = trackpipe(command, "--config", str(path), "--data-dir", str(data), *args)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.startswith("trackpipe: " + words.format(path=path)), r.stderr[-2000:]
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert r.stdout == ""


def test_config_file_limits_take_effect_and_cli_flags_win(tmp_path, fresh_server):
    file_data = tmp_path / "data-from-file"
    file_port = free_port()
    path = write(tmp_path, f"""
data_dir = "{file_data}"
[server]
port = {file_port}
[limits]
max_event_bytes = 2000
""")
    srv = fresh_server(config=path).start()  # passes --port and --data-dir
    # The flags won: the server answers on the flag's port and keeps data in the flag's dir.
    assert srv.port != file_port
    assert (srv.data_dir / "log.db").exists()
    assert not file_data.exists()
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{file_port}/health", timeout=1)
    # The file's [limits] value applies.
    assert srv.post("/v1/track", {"userId": "u", "event": "small"}).status_code == 200
    big = srv.post("/v1/track", {"userId": "u", "event": "big", "properties": {"x": "x" * 3000}})
    assert big.status_code == 400
    assert big.json()["code"] == "payload_too_large"


def test_env_limit_takes_effect_end_to_end(fresh_server, server):
    body = {"userId": "u", "event": "big", "properties": {"x": "x" * 3000}}
    assert server.post("/v1/track", body).status_code == 200  # fine under the default 32 KB
    srv = fresh_server(env={"TRACKPIPE_LIMITS_MAX_EVENT_BYTES": "2000"}).start()
    assert srv.post("/v1/track", {"userId": "u", "event": "small"}).status_code == 200
    r = srv.post("/v1/track", body)
    assert r.status_code == 400
    assert r.json()["code"] == "payload_too_large"


# -- the README documents exactly the settings there are --------------------------


def test_readme_configuration_block_is_valid_settings():
    raw = tomllib.loads(readme_config_block())
    settings = msgspec.convert(raw, Settings)  # forbid_unknown_fields: no undocumented extras
    assert isinstance(settings, Settings)


def test_readme_configuration_block_shows_the_defaults():
    raw = tomllib.loads(readme_config_block())
    assert raw == msgspec.to_builtins(Settings())


def test_every_setting_is_documented_in_the_readme():
    raw = tomllib.loads(readme_config_block())
    missing = []
    for name in Settings.__struct_fields__:
        if name not in raw:
            missing.append(name)
    for section, cls in section_types().items():
        for name in cls.__struct_fields__:
            if name not in raw.get(section, {}):
                missing.append(f"{section}.{name}")
    assert missing == [], f"settings missing from README's Configuration block: {missing}"
    assert set(section_types()) == set(config._SECTIONS)
