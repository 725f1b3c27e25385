"""The command line: run, batch, status, pause, resume, drain, retry, doctor, init, service,
worker."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any, TextIO, cast

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
from traxd.logs import Redactor, configure, get_logger

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


EXIT_CODES = """exit status:
  0    success
  1    a file failed, the daemon is not reachable or refused, a name matched nothing
  2    usage or configuration error
  130  interrupted (Ctrl-C)"""

EXAMPLES = {
    "traxd": """examples:
  traxd init                      write ~/.config/traxd/traxd.toml and the folders
  traxd run                       run the daemon in the foreground
  traxd status                    what the running daemon is doing (from another terminal)
  traxd batch ~/talks             transcribe a folder once, into ~/talks.transcripts/""",
    "run": """examples:
  traxd run
  traxd run --config demo/traxd.toml""",
    "batch": """examples:
  traxd batch ~/talks                     outputs in ~/talks.transcripts/
  traxd batch ~/talks --output ~/out      outputs in ~/out/
  traxd batch ~/talks --workers 2 --enhance

A re-run skips the files already done; failures are listed in OUTPUT/failed.jsonl.""",
    "status": """examples:
  traxd status
  traxd status --watch
  traxd status --json | jq '.inboxes[].queued'""",
    "pause": "examples:\n  traxd pause\n  traxd pause podcasts",
    "resume": "examples:\n  traxd resume\n  traxd resume podcasts",
    "drain": "examples:\n  traxd drain\n  traxd drain podcasts",
    "report": """examples:
  traxd report                    the last batch's report
  traxd report 3f2a9c --json      one batch's, for scripts
  traxd report talks.transcripts/report.json""",
    "retry": """examples:
  traxd retry                 every failed file
  traxd retry talk.mp3        one failed file, by name or inbox-relative path""",
    "doctor": """examples:
  traxd doctor
  traxd doctor --config /etc/traxd/traxd.toml

With a daemon running for this user (or the one of --config), it also asks that daemon
which API keys it has and from where, beside this shell's view: a daemon started by systemd
or launchd does not see the variables exported in this shell.""",
    "init": """examples:
  traxd init
  traxd init --demo ./demo        a demo with its own inbox, no API key needed""",
    "service": """examples:
  traxd service install --user --dry-run     show the unit without writing it
  traxd service install --user
  traxd service status --user
  traxd service uninstall --user""",
    "worker": """examples:
  traxd worker                                the queues named in [cluster] queues
  traxd worker --queues cpu,net --processes 2
  traxd worker --queues gpu,net --threads 8   gpu: as [cluster] concurrency says""",
}

DAEMON_FINDING = """Without --config it talks to the daemon running for this user (each records
its socket in $XDG_RUNTIME_DIR/traxd/ or ~/.local/state/traxd/run/, on macOS
~/Library/Caches/traxd/run/); with several running, it lists them: name one's --config."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="traxd", description="Batch media processor daemon: watched inboxes in, "
        "transcripts out.", epilog=f"{EXAMPLES['traxd']}\n\n{EXIT_CODES}",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"traxd {__version__}")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")
    _daemon_commands(sub)
    _control_commands(sub)
    _setup_commands(sub)
    _worker_command(sub)
    return parser


def _daemon_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    run = _command(sub, "run", cmd_run, "run the daemon in the foreground")
    _config_option(run)

    batch = _command(sub, "batch", cmd_batch, "process a folder once, in place")
    batch.add_argument("path", type=Path, metavar="DIR", help="the folder of media files "
                       "(sub-folders too); the files themselves are not moved or changed")
    _config_option(batch)
    batch.add_argument("--workers", type=_positive_int, metavar="N",
                       help="files processed at once (default: [daemon] workers)")
    batch.add_argument("--memory-limit", type=_positive_int, metavar="MB",
                       help="memory per file's programs (default: [daemon] memory_limit_mb)")
    batch.add_argument("--enhance", action="store_true", help="add the enhance step")
    batch.add_argument("--output", type=Path, metavar="OUTPUT", help="where results go "
                       "(default: DIR.transcripts beside DIR)")


def _control_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    status = _command(sub, "status", cmd_status, "what the running daemon is doing")
    _control_options(status)
    status.add_argument("--watch", action="store_true", help="redraw every second until Ctrl-C")

    for name, text in (("pause", "stop starting new work (running jobs finish)"),
                       ("resume", "start work again (also resumes paused backends)"),
                       ("drain", "finish running work, start no new")):
        cmd = _command(sub, name, cmd_control, text)
        _control_options(cmd)
        cmd.add_argument("inbox", nargs="?", metavar="INBOX",
                         help="one inbox by name (default: all)")

    retry = _command(sub, "retry", cmd_retry, "put failed files back into their inbox")
    _control_options(retry)
    retry.add_argument("--failed", action="store_true", help="all failed files (the default)")
    retry.add_argument("names", nargs="*", metavar="NAME",
                       help="failed files by name or inbox-relative path (default: all)")

    report = _command(sub, "report", cmd_report, "a batch's report: counts, steps, failures")
    report.add_argument("--config", "-c", type=Path, help="the config whose state_dir holds the "
                        "reports (default: $TRAXD_CONFIG, else the daemon running for this user, "
                        "else the user and system config)")
    report.add_argument("batch_id", nargs="?", metavar="BATCH_ID", help="a batch id (its "
                        "start is enough) or a report's .json file (default: the last batch)")
    report.add_argument("--last", action="store_true", help="the last batch (the default)")
    report.add_argument("--json", action="store_true", help="print the report as JSON")


def _setup_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    doctor = _command(sub, "doctor", cmd_doctor, "check ffmpeg, models, keys (this shell's and "
                      "the running daemon's), folders, limits")
    _config_option(doctor)

    init = _command(sub, "init", cmd_init, "write a commented config and the folders")
    init.add_argument("--config", type=Path, help="where to write it")
    init.add_argument("--demo", type=Path, metavar="DIR",
                      help="a self-contained demo under DIR (no API key, no server)")
    init.add_argument("--force", action="store_true", help="overwrite an existing config")

    service = _command(sub, "service", cmd_service,
                       "install, remove or inspect the systemd unit or launchd agent")
    service.add_argument("action", choices=["install", "uninstall", "status"],
                         help="install: write and enable it; uninstall: stop, disable and "
                         "remove it; status: what the service manager says of it")
    _config_option(service)
    service.add_argument("--user", action="store_true",
                         help="a per-user unit or agent (default: a system unit)")
    service.add_argument("--dry-run", action="store_true",
                         help="print what would be written, run or removed; change nothing")


def _worker_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    worker = _command(sub, "worker", cmd_worker, "run steps for a daemon over Redis ([cluster])")
    _config_option(worker)
    worker.add_argument("--queues", help="resources to take, comma-separated: cpu,gpu,net "
                        "(default: [cluster] queues)")
    worker.add_argument("--processes", type=int, default=1, help="worker processes (default 1)")
    worker.add_argument("--threads", type=int, default=2,
                        help="steps each process runs at once per queue, for the queues "
                        "[cluster] concurrency does not name (default 2)")


def _command(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str,
             handler: Handler, text: str) -> argparse.ArgumentParser:
    epilog = "\n\n".join(part for part in (EXAMPLES.get(name), EXIT_CODES) if part)
    parser = sub.add_parser(name, help=text, description=text, epilog=epilog,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(handler=handler, command=name)
    return parser


def _config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", type=Path, help="config file (default: $TRAXD_CONFIG, "
                        "then the user and system config)")


def _control_options(parser: argparse.ArgumentParser) -> None:
    parser.epilog = f"{DAEMON_FINDING}\n\n{parser.epilog}"
    parser.add_argument("--config", "-c", type=Path, help="the config of the daemon to talk to "
                        "(default: the daemon running for this user)")
    parser.add_argument("--json", action="store_true",
                        help="print the daemon's answer as JSON, for scripts")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is too small: 1 or more")
    return value


# --- commands ---------------------------------------------------------------------------------


def _redactor(settings: Settings) -> Redactor:
    """What the logs hide: the configured keys (variables and files) and other credentials."""
    return Redactor.of_environment(settings.key_variables, files=settings.key_files)


def cmd_run(args: argparse.Namespace) -> int:
    from traxd.daemon import Daemon

    settings = load_settings(args.config)
    configure(settings.daemon.log_format, settings.daemon.log_level,
              redactor=_redactor(settings))
    if not settings.inboxes:
        raise ConfigError(str(settings.source), "inbox", "no [[inbox]] configured")
    return asyncio.run(Daemon(settings).serve())


def cmd_batch(args: argparse.Namespace) -> int:
    from traxd.batch import ConsoleLog, run_batch

    settings = _batch_settings(args)
    console = Console()
    configure(settings.daemon.log_format, "warning", stream=cast(TextIO, ConsoleLog(console)),
              redactor=_redactor(settings))
    return run_batch(settings, args.path, args.output, enhance=args.enhance, console=console,
                     config=args.config)


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
    print(json.dumps(result) if args.json else control_sentence(args.command, result))
    return 0


def control_sentence(command: str, result: Mapping[str, Any]) -> str:
    """What pause, resume or drain did, as a sentence."""
    if command == "pause":
        return (f"Paused {_inboxes(result.get('paused'))}: no new jobs start, running ones "
                "finish. `traxd resume` starts work again.")
    if command == "resume":
        backends = [str(b) for b in result.get("backends") or []]
        also = f", and the {_names(backends)} backend" + ("s" if len(backends) > 1 else "")
        return f"Resumed {_inboxes(result.get('resumed'))}{also if backends else ''}."
    running = int(result.get("running", 0))
    return (f"Draining {_inboxes(result.get('draining'))}: {_count(running, 'running job')} "
            "finish, no new ones start. `traxd resume` ends the drain.")


def cmd_retry(args: argparse.Namespace) -> int:
    from traxd.control import request

    result = request(_socket(args), "retry", names=args.names or None)
    retried = [str(name) for name in result.get("retried") or []]
    unmatched = [n for n in args.names if not any(r == n or Path(r).name == n for r in retried)]
    if args.json:
        print(json.dumps({**result, "unmatched": unmatched}))
    elif retried:
        print(f"Put {_count(len(retried), 'failed file')} back into the inbox: "
              f"{_names(retried)}.")
    elif not unmatched:
        print("Nothing to retry: no file has failed.")
    for name in unmatched:
        print(f"traxd: no failed file named {name!r} (`traxd status` counts the failed ones)",
              file=sys.stderr)
    return 1 if unmatched else 0


def _inboxes(names: object) -> str:
    listed = [str(n) for n in names] if isinstance(names, list) else []
    return f"inbox {listed[0]}" if len(listed) == 1 else f"inboxes {_names(listed) or '(none)'}"


def _names(names: Sequence[str]) -> str:
    return ", ".join(names)


def _count(n: int, thing: str) -> str:
    return f"{n} {thing}" + ("" if n == 1 else "s")


def _socket(args: argparse.Namespace) -> Path:
    """The control socket: of the config named (--config, $TRAXD_CONFIG), else of the one
    daemon recorded for this user, else of the user's or system config."""
    from traxd.control import SOCKET_NAME, running_daemons, runtime_dir

    if args.config is not None or os.environ.get("TRAXD_CONFIG"):
        return load_settings(args.config).daemon.state_dir / SOCKET_NAME
    daemons = running_daemons()
    if len(daemons) == 1:
        return daemons[0].socket
    if daemons:
        listing = "".join(f"\n  traxd {args.command} --config {d.config}   (inboxes: "
                          f"{_names(d.inboxes)}; pid {d.pid})" for d in daemons)
        raise ControlUnavailable(f"{len(daemons)} daemons are running; name one:{listing}")
    try:
        settings = load_settings(None)
    except ConfigError:
        raise ControlUnavailable(
            f"traxd is not running: no daemon of this user is recorded in {runtime_dir()}. "
            "Start one with `traxd run` (or `make run` in a checkout), or name the config of "
            "one running elsewhere with --config") from None
    return settings.daemon.state_dir / SOCKET_NAME


def _running_config(args: argparse.Namespace) -> Path | None:
    """Without --config (or $TRAXD_CONFIG): the config of the one daemon running for this
    user, if one is; None (the user's or system config) otherwise."""
    from traxd.control import running_daemons

    if args.config is not None or os.environ.get("TRAXD_CONFIG"):
        return None
    daemons = running_daemons()
    return Path(daemons[0].config) if len(daemons) == 1 and daemons[0].config else None


def cmd_report(args: argparse.Namespace) -> int:
    from rich.text import Text

    from traxd.reports import find_report
    from traxd.reportview import report_renderable

    wanted: str | None = None if args.last else args.batch_id
    if wanted is not None and wanted.endswith(".json") and Path(wanted).is_file():
        path = Path(wanted)
    else:
        folder = load_settings(args.config or _running_config(args)).daemon.state_dir / "reports"
        found = find_report(folder, wanted)
        if found is None:
            which = f"batch {wanted!r}" if wanted else "any batch"
            print(f"traxd: no report of {which} in {folder} (a batch id names one report; "
                  "reports older than [daemon] report_retention are removed)", file=sys.stderr)
            return 1
        path = found
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        print(f"traxd: cannot read the report {path}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        Console().print(report_renderable(report))
        Console().print(Text(str(path.with_suffix(".md")), style="dim"))
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from traxd.doctor import ask_daemon, run_doctor

    try:
        settings: Settings | None = load_settings(args.config)
    except ConfigError as exc:
        print(f"config: {exc}", file=sys.stderr)
        settings = None
    return run_doctor(settings, Console(), ask_daemon(args.config, settings))


def cmd_worker(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    cluster = settings.cluster
    if not cluster.broker:
        raise ConfigError(str(settings.source), "cluster.broker", "a worker needs the broker: "
                          'set [cluster] broker = "redis://host:6379/0"')
    resources = tuple(args.queues.split(",")) if args.queues else cluster.queues
    if any(r not in ("cpu", "gpu", "net") for r in resources) or min(args.processes,
                                                                      args.threads) < 1:
        print("traxd: --queues takes a list drawn from cpu, gpu, net; --processes and "
              "--threads take 1 or more", file=sys.stderr)
        return 2
    configure(settings.daemon.log_format, settings.daemon.log_level,
              redactor=_redactor(settings))
    from traxd.cluster import worker

    if args.processes > 1:
        return worker.supervise(worker.worker_argv(args.config, resources, args.threads),
                                args.processes)
    return worker.run_worker(settings, resources, args.threads)


def cmd_service(args: argparse.Namespace) -> int:
    from traxd import service
    from traxd.config import find_config

    config = find_config(args.config).resolve() if args.action == "install" else Path("FILE")
    if args.action == "install":
        load_settings(config)
    if (why := service.no_service_manager()) and not args.dry_run:
        print(f"traxd service: {why.replace('FILE', str(config))}", file=sys.stderr)
        return 1
    if args.action == "status":
        return service.status(user=args.user)
    if args.action == "uninstall":
        return service.uninstall(user=args.user, console=Console(), dry_run=args.dry_run)
    return service.install(config, user=args.user, console=Console(), dry_run=args.dry_run)


def cmd_init(args: argparse.Namespace) -> int:
    configure()  # the log in UTC, as `traxd run` writes it
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
    from traxd.folders import create_folders

    create_folders(settings)
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
