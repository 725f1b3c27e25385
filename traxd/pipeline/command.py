"""The `command` step: any program, run per file from an argv template, never through a shell."""

from __future__ import annotations

import asyncio
from pathlib import Path

from traxd.errors import Permanent
from traxd.pipeline.base import StepContext, StepResult
from traxd.procs import run_process

PLACEHOLDERS = ("input", "output_dir", "stem", "name")


def render_argv(template: tuple[str, ...], values: dict[str, str]) -> list[str]:
    """Fill {input}, {output_dir}, {stem}, {name} into each argument.

    A file name can never become an option: when an argument that did not start with "-"
    would start with "-" after filling in, it is given a "./" prefix.
    """
    argv = [template[0]]
    for arg in template[1:]:
        filled = arg
        for key in PLACEHOLDERS:
            filled = filled.replace("{" + key + "}", values[key])
        if filled.startswith("-") and not arg.startswith("-"):
            filled = "./" + filled
        argv.append(filled)
    return argv


class CommandStep:
    """Runs argv per file; files the program writes into {output_dir} become outputs."""

    needs_workdir = True

    def __init__(self, template: tuple[str, ...]) -> None:
        self.template = template
        self.name = "command:" + Path(template[0]).name

    async def run(self, ctx: StepContext) -> StepResult:
        out_dir = ctx.workdir / "out"
        out_dir.mkdir()
        argv = render_argv(self.template, {
            "input": str(ctx.input.absolute()), "output_dir": str(out_dir.absolute()),
            "stem": ctx.job.stem, "name": ctx.job.filename,
        })
        try:
            result = await run_process(argv, limits=ctx.limits, cwd=ctx.workdir)
        except FileNotFoundError as exc:
            raise Permanent(f"command not found: {argv[0]}", reason="command") from exc
        if result.returncode != 0:
            how = result.signal_name or f"exit status {result.returncode}"
            raise Permanent(f"{argv[0]} failed ({how}): {result.stderr_tail[-2000:]}",
                            reason="command")
        return StepResult(artifacts=await asyncio.to_thread(_files_in, out_dir))

    async def aclose(self) -> None:
        return None


def _files_in(folder: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted(folder.iterdir()) if p.is_file()}
