"""The command line: run, batch, status, pause, resume, drain, retry, doctor, init, service."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from string import Template

from rich.console import Console

from traxd import __version__
from traxd.config import Settings, load_settings, user_config_path, with_overrides
from traxd.errors import (
    AlreadyRunning,
    ConfigError,
    ControlRejected,
    ControlUnavailable,
    JournalError,
)
from traxd.logs import configure, get_logger

Handler = Callable[[argparse.Namespace], int]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except ConfigError as exc:
        print(f"traxd: configuration error: {exc}", file=sys.stderr)
        return 2
    except (JournalError, AlreadyRunning, ControlUnavailable, ControlRejected) as exc:
        print(f"traxd: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="traxd", description="Batch media processor daemon.")
    parser.add_argument("--version", action="version", version=f"traxd {__version__}")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    run = _command(sub, "run", cmd_run, "run the daemon in the foreground")
    _config_option(run)

    batch = _command(sub, "batch", cmd_batch, "process a folder once, in place")
    batch.add_argument("path", type=Path)
    _config_option(batch)
    batch.add_argument("--workers", type=int)
    batch.add_argument("--memory-limit", type=int, metavar="MB")
    batch.add_argument("--enhance", action="store_true", help="add the enhance step")
    batch.add_argument("--output", type=Path, metavar="DIR")

    status = _command(sub, "status", cmd_status, "what the running daemon is doing")
    _config_option(status)
    status.add_argument("--json", action="store_true")
    status.add_argument("--watch", action="store_true")

    for name, text in (("pause", "stop starting new work"), ("resume", "start work again"),
                       ("drain", "finish running work, start no new")):
        cmd = _command(sub, name, cmd_control, text)
        _config_option(cmd)
        cmd.add_argument("inbox", nargs="?")

    retry = _command(sub, "retry", cmd_retry, "put failed files back into their inbox")
    _config_option(retry)
    retry.add_argument("--failed", action="store_true", help="all failed files (the default)")
    retry.add_argument("names", nargs="*")

    doctor = _command(sub, "doctor", cmd_doctor, "check ffmpeg, models, keys, folders, limits")
    _config_option(doctor)

    init = _command(sub, "init", cmd_init, "write a commented config and the folders")
    init.add_argument("--config", type=Path, help="where to write it")
    init.add_argument("--demo", type=Path, metavar="DIR",
                      help="a self-contained demo under DIR (no API key, no server)")
    init.add_argument("--force", action="store_true")

    service = _command(sub, "service", cmd_service, "install the systemd unit or launchd agent")
    service.add_argument("action", choices=["install"])
    _config_option(service)
    service.add_argument("--user", action="store_true")
    service.add_argument("--dry-run", action="store_true")
    return parser


def _command(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str,
             handler: Handler, text: str) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=text, description=text)
    parser.set_defaults(handler=handler, command=name)
    return parser


def _config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", type=Path, help="config file (default: $TRAXD_CONFIG, "
                        "then the user and system config)")


# --- commands ---------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from traxd.daemon import Daemon

    settings = load_settings(args.config)
    configure(settings.daemon.log_format, settings.daemon.log_level)
    if not settings.inboxes:
        raise ConfigError(str(settings.source), "inbox", "no [[inbox]] configured")
    return asyncio.run(Daemon(settings).serve())


def cmd_batch(args: argparse.Namespace) -> int:
    from traxd.batch import run_batch

    settings = _batch_settings(args)
    configure(settings.daemon.log_format, "warning")
    return run_batch(settings, args.path, args.output, enhance=args.enhance, console=Console())


def _batch_settings(args: argparse.Namespace) -> Settings:
    try:
        settings = load_settings(args.config)
    except ConfigError:
        if args.config is not None:
            raise
        settings = Settings()
    return with_overrides(settings, workers=args.workers, memory_limit_mb=args.memory_limit)


def cmd_status(args: argparse.Namespace) -> int:
    from traxd.control import request
    from traxd.statusview import render_status, watch_status

    socket_path = _socket(args)
    console = Console()
    if args.watch:
        watch_status(socket_path, console, 1.0)
        return 0
    data = request(socket_path, "status")
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        render_status(data, console)
    return 0


def cmd_control(args: argparse.Namespace) -> int:
    from traxd.control import request

    result = request(_socket(args), args.command, inbox=args.inbox)
    print(json.dumps(result))
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    from traxd.control import request

    result = request(_socket(args), "retry", names=args.names or None)
    print(json.dumps(result))
    return 0


def _socket(args: argparse.Namespace) -> Path:
    return load_settings(args.config).daemon.state_dir / "traxd.sock"


def cmd_doctor(args: argparse.Namespace) -> int:
    from traxd.doctor import run_doctor

    try:
        settings: Settings | None = load_settings(args.config)
    except ConfigError as exc:
        print(f"config: {exc}", file=sys.stderr)
        settings = None
    return run_doctor(settings, Console())


def cmd_service(args: argparse.Namespace) -> int:
    from traxd.config import find_config
    from traxd.service import install

    config = find_config(args.config).resolve()
    load_settings(config)
    return install(config, user=args.user, console=Console(), dry_run=args.dry_run)


def cmd_init(args: argparse.Namespace) -> int:
    if args.demo is not None:
        root = args.demo.resolve()
        target = args.config or root / "traxd.toml"
        values = _demo_values(root)
    else:
        target = args.config or user_config_path()
        values = _default_values()
    if target.exists() and not args.force:
        print(f"traxd: {target} exists; --force to overwrite", file=sys.stderr)
        return 1
    text = Template(resources.files("traxd").joinpath("templates/traxd.toml").read_text())
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text.substitute(values), encoding="utf-8")
    settings = load_settings(target)
    for inbox in settings.inboxes:
        from traxd.folders import InboxFolders

        InboxFolders.of(inbox, settings.folders).create()
    get_logger().info("config_written", path=str(target))
    print(f"wrote {target}; inbox: {settings.inboxes[0].path}")
    return 0


def _demo_values(root: Path) -> dict[str, str]:
    return {
        "state_dir": str(root / "state"), "batch_interval": "2s", "settle_seconds": "1.0",
        "metrics_address": "127.0.0.1:9108", "log_format": "console", "inbox_name": "demo",
        "inbox_path": str(root / "inbox"),
        "pipeline": '["download", "preprocess", "transcribe"]',
    }


def _default_values() -> dict[str, str]:
    return {
        "state_dir": "~/.local/state/traxd", "batch_interval": "5s", "settle_seconds": "2.0",
        "metrics_address": "127.0.0.1:9108", "log_format": "auto", "inbox_name": "inbox",
        "inbox_path": "~/Trax/inbox", "pipeline": '["download", "preprocess", "transcribe"]',
    }
