"""`traxd doctor`: each check on real folders and a fake /proc, secrets never shown."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from tests.helpers import DaemonProcess, base_daemon, write_config
from traxd.config import (
    DaemonSettings,
    EnhanceSettings,
    InboxSettings,
    Settings,
    TranscribeSettings,
)
from traxd.doctor import (
    Check,
    check_api_keys,
    check_disk,
    check_folders,
    check_inotify,
    check_privacy,
    count_directories,
    folder_state,
    run_doctor,
)
from traxd.keys import KeyNeed, service_manager, where_to_put

SECRET = "sk-doctor-test-0123456789abcdef"


def settings_for(root: Path, *pipeline: str, **transcribe: str) -> Settings:
    inbox = InboxSettings(name="talks", path=root / "talks" / "inbox",
                          pipeline=pipeline or ("preprocess",))
    return Settings(daemon=DaemonSettings(state_dir=root / "state"), inboxes=(inbox,),
                    transcribe=TranscribeSettings(**transcribe),  # type: ignore[arg-type]
                    enhance=EnhanceSettings(api_key_env="TRAXD_TEST_ENHANCE_KEY"))


def doctor_output(settings: Settings | None) -> tuple[int, str]:
    out = io.StringIO()
    code = run_doctor(settings, Console(file=out, width=250, color_system=None))
    return code, out.getvalue()


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


def test_a_healthy_setup_passes(tmp_path: Path) -> None:
    code, text = doctor_output(settings_for(tmp_path))
    assert code == 0, text
    assert "ffmpeg" in text and "inbox talks" in text and "disk space" in text


def test_a_missing_api_key_fails_and_a_present_one_is_never_shown(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given an inbox that enhances, without the key
    settings = settings_for(tmp_path, "preprocess", "enhance")
    monkeypatch.delenv("TRAXD_TEST_ENHANCE_KEY", raising=False)

    # Then the doctor fails and names the variable
    code, text = doctor_output(settings)
    assert code == 1
    assert "TRAXD_TEST_ENHANCE_KEY" in text and "not set" in text

    # When the key is set, Then the check passes without printing it
    monkeypatch.setenv("TRAXD_TEST_ENHANCE_KEY", SECRET)
    code, text = doctor_output(settings)
    assert code == 0, text
    assert SECRET not in text and SECRET[:8] not in text


def test_a_key_file_is_checked_and_its_key_never_shown(tmp_path: Path) -> None:
    # Given the transcription key named as a file that is not there
    key_file = tmp_path / "openai.key"
    settings = settings_for(tmp_path, "transcribe", backend="openai")
    settings = Settings(daemon=settings.daemon, inboxes=settings.inboxes,
                        transcribe=TranscribeSettings(backend="openai", api_key_file=key_file))
    # Then the doctor fails and names the file
    [check] = check_api_keys(settings)
    assert (check.level, check.name) == ("fail", f"API key file {key_file}")
    # When the key is there, Then it passes without showing it
    key_file.write_text(SECRET + "\n")
    [check] = check_api_keys(settings)
    assert check.level == "ok" and SECRET not in check.detail


def test_keys_are_checked_only_for_backends_in_use(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert check_api_keys(settings_for(tmp_path, "preprocess")) == []
    remote = settings_for(tmp_path, "transcribe", backend="openai")
    assert [c.level for c in check_api_keys(remote)] == ["fail"]
    local_server = settings_for(tmp_path, "transcribe", backend="openai",
                                base_url="http://127.0.0.1:8000/v1")
    assert [c.level for c in check_api_keys(local_server)] == ["warn"]


def test_folders_that_can_be_created_are_fine(tmp_path: Path) -> None:
    checks = by_name(check_folders(settings_for(tmp_path)))
    assert checks["inbox talks"].level == "ok"
    assert "will be created" in checks["inbox talks"].detail
    assert checks["state_dir"].level == "ok"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_a_read_only_parent_fails(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        assert folder_state(locked / "inbox")[0] == "fail"
    finally:
        locked.chmod(0o700)


def test_a_file_in_place_of_a_folder_fails(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    (tmp_path / "talks").mkdir()
    (tmp_path / "talks" / "done").write_text("oops")
    check = by_name(check_folders(settings))["inbox talks"]
    assert check.level == "fail"
    assert "done" in check.detail and "not a folder" in check.detail


def test_disk_space_is_reported_once_per_filesystem(tmp_path: Path) -> None:
    checks = check_disk(settings_for(tmp_path))
    assert len(checks) == 1
    assert "inbox talks" in checks[0].detail and "state_dir" in checks[0].detail
    assert "GiB free" in checks[0].detail


def fake_proc(root: Path, watches: int, instances: int) -> Path:
    proc = root / "proc-inotify"
    proc.mkdir(parents=True)
    (proc / "max_user_watches").write_text(f"{watches}\n")
    (proc / "max_user_instances").write_text(f"{instances}\n")
    return proc


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux only")
def test_inotify_limits_against_the_directories_to_watch(tmp_path: Path) -> None:
    # Given an inbox with 20 sub-folders
    settings = settings_for(tmp_path)
    for index in range(20):
        (settings.inboxes[0].path / f"show-{index}").mkdir(parents=True)

    # Then a generous limit is ok, a tight one warns, a small one fails
    levels = []
    for watches in (1000, 30, 10):
        proc = fake_proc(tmp_path / f"limit-{watches}", watches, 128)
        checks = by_name(check_inotify(settings, proc))
        levels.append(checks["inotify watches"].level)
        assert checks["inotify instances"].level == "ok"
    assert levels == ["ok", "warn", "fail"]
    assert "sysctl -w fs.inotify.max_user_watches=" in checks["inotify watches"].detail


def test_count_directories_stops_at_the_limit(tmp_path: Path) -> None:
    for index in range(10):
        (tmp_path / f"d{index}").mkdir()
    assert count_directories(tmp_path, limit=1000) == 11
    assert count_directories(tmp_path, limit=4) == 4


def test_macos_privacy_protected_folders_warn(tmp_path: Path) -> None:
    home = tmp_path / "home"
    inboxes = (InboxSettings(name="docs", path=home / "Documents" / "trax" / "inbox"),
               InboxSettings(name="usb", path=Path("/Volumes/USB/trax/inbox")),
               InboxSettings(name="fine", path=home / "Trax" / "inbox"))
    settings = Settings(inboxes=inboxes)
    checks = check_privacy(settings, platform="darwin", home=home)
    assert [c.name for c in checks] == ["privacy docs", "privacy usb"]
    assert all(c.level == "warn" and "Full Disk Access" in c.detail for c in checks)
    assert check_privacy(settings, platform="linux", home=home) == []


def test_without_a_config_the_doctor_fails_but_still_checks_tools() -> None:
    code, text = doctor_output(None)
    assert code == 1
    assert "ffmpeg" in text and "config" in text


# --- what the running daemon sees --------------------------------------------------------


def test_where_a_key_goes_depends_on_what_started_the_daemon(tmp_path: Path) -> None:
    env = KeyNeed("enhance", "enhance", "DEEPSEEK_API_KEY", None, None)
    in_file = KeyNeed("enhance", "enhance", "DEEPSEEK_API_KEY", tmp_path / "k", None)
    user = {"INVOCATION_ID": "abc", "XDG_CONFIG_HOME": str(tmp_path / "cfg")}
    assert service_manager(user, ppid=4242, platform="linux") == "systemd-user"
    assert service_manager(user, ppid=1, platform="linux") == "systemd-system"
    assert service_manager({}, ppid=1, platform="linux") == "none"
    assert service_manager({"XPC_SERVICE_NAME": "com.trax.traxd"}, platform="darwin") \
        == "launchd"
    assert f"in {tmp_path / 'cfg' / 'traxd' / 'traxd.env'}" in where_to_put(
        env, "systemd-user", user)
    assert "systemctl --user restart traxd" in where_to_put(env, "systemd-user", user)
    assert "/etc/traxd/traxd.env" in where_to_put(env, "systemd-system", user)
    assert "EnvironmentVariables" in where_to_put(env, "launchd")
    assert "export DEEPSEEK_API_KEY=" in where_to_put(env, "none")
    assert where_to_put(in_file, "systemd-user").startswith(f"put the key in {tmp_path / 'k'}")


def user_config(tmp_path: Path) -> Path:
    """Where `traxd doctor` looks for the config of the user of `doctor_env`."""
    folder = tmp_path / "cfg" / "traxd"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / "traxd.toml"


def doctor_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A user whose config is in ~/.config (a temporary one), as `traxd doctor` finds it."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRAXD_CONFIG", "INVOCATION_ID")}
    return {**env, "XDG_RUNTIME_DIR": str(tmp_path / "run"),
            "XDG_CONFIG_HOME": str(tmp_path / "cfg"), "COLUMNS": "250", **extra}


def test_doctor_compares_this_shell_with_the_running_daemon(short_tmp: Path) -> None:
    # Given a daemon whose enhance key is a variable it was started without, and whose
    # transcription key is a file not written yet
    key_file = short_tmp / "openai.key"
    config = write_config(
        user_config(short_tmp), base_daemon(short_tmp),
        [{"name": "talks", "path": str(short_tmp / "talks" / "inbox"),
          "pipeline": ["preprocess", "transcribe", "enhance"]}],
        transcribe={"backend": "openai", "base_url": "https://api.example.org/v1",
                    "api_key_file": str(key_file)},
        enhance={"api_key_env": "TRAXD_TEST_DOCTOR_KEY"})
    daemon = DaemonProcess(config, short_tmp / "daemon.log",
                           env={**doctor_env(short_tmp), "INVOCATION_ID": ""}).start()
    shell = doctor_env(short_tmp, TRAXD_TEST_DOCTOR_KEY=SECRET)
    try:
        # When doctor runs, without --config, in a shell that has the variable
        first = run_traxd(shell, "doctor")
        key_file.write_text(SECRET + "\n")
        second = run_traxd(shell, "doctor")
    finally:
        daemon.stop()
    # Then it shows both views: the shell has the key, the daemon does not, and where
    # the daemon's key goes; it fails, and never shows a key
    assert first.returncode == 1, first.stdout + first.stderr
    rows = table_rows(first.stdout, "enhance: TRAXD_TEST_DOCTOR_KEY")
    assert rows[0] == "key set"
    assert rows[1].startswith("no key (not set) -> export TRAXD_TEST_DOCTOR_KEY=")
    assert daemon.proc is not None and f"pid {daemon.proc.pid}" in first.stdout
    assert "the running daemon lacks 2 API keys" in first.stdout
    file_row = table_rows(first.stdout, f"transcribe: file {key_file}")
    assert file_row[0].startswith("no key (cannot read it")
    assert f"-> put the key in {key_file}" in file_row[1]
    # And once the key is in the file, both see it there; the variable is still missing
    assert table_rows(second.stdout, f"transcribe: file {key_file}") == ["key set", "key set"]
    assert "the running daemon lacks 1 API key " in second.stdout
    assert SECRET not in first.stdout + second.stdout + daemon.log_text()


def run_traxd(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "traxd", *args], capture_output=True,
                          text=True, timeout=60, check=False, env=env)


def table_rows(text: str, label: str) -> list[str]:
    """The other cells of the keys table's row for `label`."""
    line = next(line for line in text.splitlines() if f"│ {label} " in line)
    cells = [cell.strip() for cell in line.strip().strip("│").split("│")]
    assert cells[0] == label, cells
    return cells[1:]


def test_doctor_says_when_no_daemon_runs(short_tmp: Path) -> None:
    write_config(user_config(short_tmp), base_daemon(short_tmp),
                 [{"name": "talks", "path": str(short_tmp / "talks" / "inbox")}])
    result = run_traxd(doctor_env(short_tmp), "doctor")
    assert "running daemon: not asked: traxd is not running" in result.stdout, result.stdout
