"""Config: the DESIGN.md example loads; every bad key or value names file, key and reason."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from traxd.config import find_config, load_settings, parse_duration
from traxd.errors import ConfigError

DESIGN_EXAMPLE = """
[daemon]
state_dir = "~/.local/state/traxd"
workers = 8
memory_limit_mb = 2048
cpu_limit_percent = 90
batch_interval = "5s"
settle_seconds = 2.0
metrics_address = "127.0.0.1:9108"
log_format = "json"

[[inbox]]
name = "podcasts"
path = "~/Trax/podcasts/inbox"
pipeline = ["preprocess", "transcribe", "enhance"]
formats = ["txt", "srt", "vtt", "json"]
priority = 5
schedule = "always"

[[inbox]]
name = "night"
path = "~/Trax/night/inbox"
pipeline = [{ command = ["ffmpeg", "-i", "{input}", "{output_dir}/{stem}.opus"] }]
schedule = "0 1-5 * * *"

[transcribe]
backend = "local"
model = "tiny.en"
language = "en"
chunk_seconds = 600

[cluster]
broker = "redis://127.0.0.1:6379/0"

[enhance]
base_url = "https://api.deepseek.com"
model = "deepseek-chat"
api_key_env = "DEEPSEEK_API_KEY"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "traxd.toml"
    path.write_text(textwrap.dedent(text))
    return path


def test_design_example_loads(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, DESIGN_EXAMPLE))
    assert settings.daemon.workers == 8
    assert settings.daemon.batch_interval == 5.0
    assert settings.daemon.state_dir == Path("~/.local/state/traxd").expanduser()
    assert [i.name for i in settings.inboxes] == ["podcasts", "night"]
    assert settings.inboxes[0].pipeline == ("preprocess", "transcribe", "enhance")
    assert settings.inboxes[1].pipeline == (
        ("ffmpeg", "-i", "{input}", "{output_dir}/{stem}.opus"),)
    assert settings.transcribe.language == "en"
    assert settings.cluster.broker == "redis://127.0.0.1:6379/0"


@pytest.mark.parametrize(("text", "key", "reason"), [
    ("[daemon]\nworkerz = 3\n", "daemon.workerz", "unknown key"),
    ("[daemon]\nworkers = 0\n", "daemon.workers", "at least 1"),
    ("[daemon]\nworkers = \"8\"\n", "daemon.workers", "expected int"),
    ("[daemon]\nbatch_interval = \"soon\"\n", "daemon.batch_interval", "duration"),
    ("[daemon]\nlog_format = \"xml\"\n", "daemon.log_format", "must be one of"),
    ("[nonsense]\n", "nonsense", "unknown section"),
    ("[[inbox]]\nname = \"a\"\n", "inbox[0].path", "missing"),
    ("[[inbox]]\nname = \"a\"\npath = \"/x/in\"\npipeline = [\"transcode\"]\n",
     "inbox[0].pipeline", "unknown step"),
    ("[[inbox]]\nname = \"a\"\npath = \"/x/in\"\nschedule = \"every night\"\n",
     "inbox[0].schedule", "cron"),
    ("[[inbox]]\nname = \"a\"\npath = \"/x/in\"\n[[inbox]]\nname = \"b\"\npath = \"/x/in/sub\"\n",
     "inbox[1].path", "overlaps"),
    ("[daemon]\nstate_dir = \"/x/in/.state\"\n[[inbox]]\nname = \"a\"\npath = \"/x/in\"\n",
     "daemon.state_dir", "overlaps the inbox folder"),
    ("[daemon]\nstate_dir = \"/x/outputs\"\n[[inbox]]\nname = \"a\"\npath = \"/x/in\"\n",
     "daemon.state_dir", "overlaps the outputs folder"),
    ("[[inbox]]\nname = \"a\"\npath = \"/x/in\"\n"
     "[[inbox]]\nname = \"b\"\npath = \"/x/done/b/in\"\n",
     "inbox[1].path", "overlaps the folders of inbox 'a'"),
    ("[transcribe]\nbackend = \"cloud\"\n", "transcribe.backend", "must be one of"),
    ("[daemon\n", "-", "not valid TOML"),
])
def test_bad_config_names_file_key_and_reason(tmp_path: Path, text: str, key: str,
                                              reason: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert caught.value.file == str(path)
    assert caught.value.key == key
    assert reason in caught.value.why


@pytest.mark.parametrize(("value", "seconds"), [
    (5, 5.0), (2.5, 2.5), ("5s", 5.0), ("2m", 120.0), ("1h", 3600.0), ("250ms", 0.25)])
def test_durations(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


def test_lookup_order_argument_then_env_then_user(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    user = tmp_path / "xdg" / "traxd" / "traxd.toml"
    user.parent.mkdir(parents=True)
    user.write_text("")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("TRAXD_CONFIG", raising=False)
    assert find_config() == user
    monkeypatch.setenv("TRAXD_CONFIG", str(tmp_path / "env.toml"))
    assert find_config() == tmp_path / "env.toml"
    assert find_config(tmp_path / "arg.toml") == tmp_path / "arg.toml"
