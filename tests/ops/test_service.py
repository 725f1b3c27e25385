"""Service files: one template, verified by systemd-analyze and plistlib; install dry-run."""

from __future__ import annotations

import io
import os
import plistlib
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from rich.console import Console

from tests.ops.conftest import REPO
from traxd.service import (
    EXAMPLE_PYTHON,
    example_files,
    exec_start,
    install,
    plan_install,
    read_write_paths,
    render,
)

UNIT_LINES = ("Type=notify", "NotifyAccess=main", "Restart=on-failure", "KillMode=mixed",
              "NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes",
              "ProtectKernelTunables=yes", "ProtectKernelModules=yes",
              "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
              "ExecReload=/bin/kill -HUP $MAINPID")


def write_config(path: Path, root: Path, **daemon: str) -> Path:
    extra = "".join(f"{key} = {value}\n" for key, value in daemon.items())
    path.write_text(f'[daemon]\nstate_dir = "{root / "state"}"\n{extra}\n'
                    f'[[inbox]]\nname = "talks"\npath = "{root / "media" / "talks" / "inbox"}"\n')
    return path


def console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=200, color_system=None), out


# --- one source of truth -----------------------------------------------------------------


@pytest.mark.parametrize("relative", sorted(example_files()))
def test_repository_examples_are_renderings_of_the_templates(relative: str) -> None:
    expected = example_files()[relative]
    actual = (REPO / relative).read_text(encoding="utf-8")
    assert actual == expected, f"{relative} is stale: python -m traxd.service --write-examples ."


def test_templates_ship_with_the_package() -> None:
    assert "Type=notify" in render("traxd.service.in", _all_values())


def _all_values() -> dict[str, str]:
    return dict.fromkeys(["DESCRIPTION", "EXEC_START", "USER", "TIMEOUT_STOP_SEC",
                          "STATE_DIRECTORY", "READ_WRITE_PATHS", "WANTED_BY"], "x")


def test_a_missing_value_is_an_error() -> None:
    with pytest.raises(KeyError, match="@WANTED_BY@"):
        render("traxd.service.in", {k: v for k, v in _all_values().items() if k != "WANTED_BY"})


@pytest.mark.parametrize("unit", ["traxd.service", "traxd@.service"])
def test_units_have_the_required_settings(unit: str) -> None:
    text = (REPO / "systemd" / unit).read_text()
    lines = text.splitlines()
    for line in UNIT_LINES:
        assert line in lines
    assert "PrivateDevices" not in "\n".join(x for x in lines if not x.startswith("#"))
    stop = next(int(x.split("=")[1]) for x in lines if x.startswith("TimeoutStopSec="))
    assert stop > 30  # above the default shutdown_grace
    assert any(x.startswith("WatchdogSec=") for x in lines)


def test_the_template_unit_takes_its_config_from_the_instance() -> None:
    text = (REPO / "systemd" / "traxd@.service").read_text()
    assert "--config /etc/traxd/%i.toml" in text
    assert "StateDirectory=traxd/%i" in text


# --- systemd-analyze verify --------------------------------------------------------------


def systemd_analyze() -> str:
    binary = shutil.which("systemd-analyze")
    if binary is None:
        pytest.skip("systemd-analyze is not installed")
    return binary


def verify(unit_path: Path, *, user: bool = False) -> list[str]:
    """Problems systemd-analyze finds in a unit: a failure, or any warning naming it."""
    argv = [systemd_analyze(), *(["--user"] if user else []), "verify", "--man=no", str(unit_path)]
    env = {**os.environ, "XDG_RUNTIME_DIR": str(unit_path.parent), "SYSTEMD_LOG_COLOR": "0"}
    done = subprocess.run(argv, capture_output=True, text=True, check=False, env=env)
    stem = unit_path.name.split("@")[0]
    problems = [line for line in (done.stdout + done.stderr).splitlines() if stem in line]
    if done.returncode != 0:
        problems.append(f"exit status {done.returncode}")
    return problems


def runnable_copy(unit: str, folder: Path) -> Path:
    """The repository's unit with ExecStart pointing at this Python (which exists)."""
    text = (REPO / "systemd" / unit).read_text().replace(EXAMPLE_PYTHON, sys.executable)
    target = folder / unit
    target.write_text(text)
    return target


def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    assert verify(runnable_copy("traxd.service", tmp_path)) == []


def test_systemd_analyze_verifies_an_instance_of_the_template(tmp_path: Path) -> None:
    runnable_copy("traxd@.service", tmp_path)
    assert verify(tmp_path / "traxd@podcasts.service") == []


def test_systemd_analyze_verifies_an_installed_user_unit(tmp_path: Path) -> None:
    # Given a user installation whose paths need quoting and escaping
    root = tmp_path / "my media 100%"
    config = write_config(tmp_path / "traxd.toml", root)
    plan = plan_install(config, user=True, platform="linux", home=tmp_path)
    unit = tmp_path / "traxd.service"
    unit.write_text(plan.files[0][1])

    # Then systemd accepts it both as a user and as a system unit
    assert verify(unit, user=True) == []
    assert verify(unit) == []


def test_the_verify_check_catches_a_broken_unit(tmp_path: Path) -> None:
    unit = runnable_copy("traxd.service", tmp_path)
    unit.write_text(unit.read_text().replace("KillMode=mixed", "KillMode=mixed\nKilMode=all"))
    assert verify(unit)
    unit.write_text((REPO / "systemd/traxd.service").read_text())  # ExecStart does not exist
    assert verify(unit)


# --- launchd -----------------------------------------------------------------------------


def test_launchd_plist_keys_and_types() -> None:
    with (REPO / "launchd" / "com.trax.traxd.plist").open("rb") as handle:
        plist = plistlib.load(handle)
    assert plist["Label"] == "com.trax.traxd"
    assert plist["ProgramArguments"][1:5] == ["-m", "traxd", "run", "--config"]
    assert all(isinstance(arg, str) for arg in plist["ProgramArguments"])
    assert plist["RunAtLoad"] is True
    assert plist["KeepAlive"] == {"SuccessfulExit": False}
    assert plist["ProcessType"] == "Background"
    assert isinstance(plist["ThrottleInterval"], int)
    assert isinstance(plist["ExitTimeOut"], int) and plist["ExitTimeOut"] > 30
    assert plist["StandardOutPath"].startswith("/")
    assert plist["StandardErrorPath"].startswith("/")
    path = plist["EnvironmentVariables"]["PATH"].split(":")
    assert "/opt/homebrew/bin" in path and "/usr/local/bin" in path


def test_launchd_plan_escapes_and_bootstraps(tmp_path: Path) -> None:
    root = tmp_path / "Tom & Jerry"
    config = write_config(tmp_path / "traxd.toml", root)
    plan = plan_install(config, user=True, platform="darwin", home=tmp_path)

    (path, text), = plan.files
    plist = plistlib.loads(text.encode())
    assert path == tmp_path / "Library/LaunchAgents/com.trax.traxd.plist"
    assert plist["ProgramArguments"] == [sys.executable, "-m", "traxd", "run", "--config",
                                         str(config.resolve())]
    assert plist["StandardOutPath"] == str(tmp_path / "Library/Logs/traxd/traxd.log")
    bootstrap = plan.commands[-1].argv
    assert bootstrap == ("launchctl", "bootstrap", f"gui/{os.getuid()}", str(path))


# --- install -----------------------------------------------------------------------------


def test_install_dry_run_shows_the_unit_and_commands_without_doing_anything(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    config = write_config(tmp_path / "traxd.toml", tmp_path, shutdown_grace='"2m"')
    out_console, out = console()

    code = install(config, user=True, console=out_console, dry_run=True)

    shown = out.getvalue()
    assert code == 0
    unit_path = tmp_path / "xdg/systemd/user/traxd.service"
    assert f"would write {unit_path}" in shown
    assert f"ExecStart={sys.executable} -m traxd run --config {config.resolve()}" in shown
    assert f"ReadWritePaths=-{(tmp_path / 'media/talks').resolve()} -{tmp_path / 'state'}" in shown
    assert "TimeoutStopSec=135" in shown
    assert "WantedBy=default.target" in shown
    assert "User=" not in shown
    assert "would run: systemctl --user daemon-reload" in shown
    assert "would run: systemctl --user enable --now traxd.service" in shown
    assert not unit_path.exists()


def test_install_writes_the_unit_then_runs_systemctl(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    config = write_config(tmp_path / "traxd.toml", tmp_path)
    ran: list[Sequence[str]] = []

    def runner(argv: Sequence[str]) -> int:
        ran.append(tuple(argv))
        return 0

    code = install(config, user=True, console=console()[0], runner=runner)

    assert code == 0
    unit = (tmp_path / "xdg/systemd/user/traxd.service").read_text()
    assert "Type=notify" in unit
    assert ran == [("systemctl", "--user", "daemon-reload"),
                   ("systemctl", "--user", "enable", "--now", "traxd.service")]


def test_install_stops_at_a_failing_command(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    config = write_config(tmp_path / "traxd.toml", tmp_path)
    ran: list[Sequence[str]] = []

    def runner(argv: Sequence[str]) -> int:
        ran.append(argv)
        return 1

    out_console, out = console()
    assert install(config, user=True, console=out_console, runner=runner) == 1
    assert len(ran) == 1
    assert "failed (1): systemctl --user daemon-reload" in out.getvalue()


def test_a_system_unit_runs_as_the_installing_user(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUDO_USER", "alice")
    config = write_config(tmp_path / "traxd.toml", tmp_path)
    plan = plan_install(config, user=False, platform="linux", home=tmp_path)
    (path, text), = plan.files
    assert path == Path("/etc/systemd/system/traxd.service")
    assert "\nUser=alice\n" in text
    assert "WantedBy=multi-user.target" in text
    assert plan.commands[-1].argv == ("systemctl", "enable", "--now", "traxd.service")


def test_unsupported_platform_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "win32")
    out_console, out = console()
    config = write_config(tmp_path / "traxd.toml", tmp_path)
    assert install(config, user=True, console=out_console, dry_run=True) == 1
    assert "win32" in out.getvalue()


@pytest.mark.parametrize(("python", "config", "expected"), [
    ("/usr/bin/python3", "/etc/traxd/traxd.toml",
     "/usr/bin/python3 -m traxd run --config /etc/traxd/traxd.toml"),
    ("/opt/my env/python", "/home/a/100% $HOME/t.toml",
     '"/opt/my env/python" -m traxd run --config "/home/a/100%% $$HOME/t.toml"'),
])
def test_exec_start_quoting(python: str, config: str, expected: str) -> None:
    assert exec_start(python, config) == expected


def test_read_write_paths_quoting() -> None:
    assert read_write_paths([Path("/srv/a b"), Path("/srv/c")]) == '"-/srv/a b" -/srv/c'
