"""The `command` step: any program, run per file from an argv template, never through a shell."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

from traxd.errors import Permanent
from traxd.pipeline.base import BESIDE, StepContext, StepResult
from traxd.procs import run_process

PLACEHOLDERS = ("input", "output_dir", "stem", "name", "source")
# Outputs of earlier steps: {srt} is the file `<stem>.srt` that an earlier step wrote.
OUTPUT_PLACEHOLDERS = ("srt", "vtt", "txt", "json")
EARLIER = "earlier"  # in the step's folder: the outputs of earlier steps, for {outputs_dir}
_PLACEHOLDER = re.compile(r"\{(" + "|".join((*PLACEHOLDERS, *OUTPUT_PLACEHOLDERS,
                                              "outputs_dir")) + r")\}")


def used_placeholders(template: tuple[str, ...]) -> set[str]:
    """The placeholders of earlier steps' outputs (and {outputs_dir}) the template uses."""
    names = (*OUTPUT_PLACEHOLDERS, "outputs_dir")
    return {key for key in names for arg in template[1:] if "{" + key + "}" in arg}


def output_values(template: tuple[str, ...], stem: str,
                  artifacts: Mapping[str, Path]) -> dict[str, str]:
    """{srt}, {vtt}, {txt}, {json}: absolute paths of the outputs the template names; one
    that no earlier step wrote is a Permanent error naming it."""
    values = {}
    for key in sorted(used_placeholders(template) & set(OUTPUT_PLACEHOLDERS)):
        name = f"{stem}.{key}"
        if name not in artifacts:
            raise Permanent(f"the command uses {{{key}}} but no earlier step wrote {name} "
                            f"(put transcribe before the command, with {key!r} in the inbox's "
                            "formats)", reason="command")
        values[key] = str(artifacts[name].absolute())
    return values


def gather_outputs(artifacts: Mapping[str, Path], folder: Path) -> Path:
    """A folder holding the outputs of earlier steps under their output names (links where
    the disk allows, else copies)."""
    folder.mkdir()
    for name, path in artifacts.items():
        if name.startswith(BESIDE):
            continue
        try:
            os.link(path, folder / name)
        except OSError:
            shutil.copyfile(path, folder / name)
    return folder


def render_argv(template: tuple[str, ...], values: dict[str, str]) -> list[str]:
    """Fill {input}, {output_dir}, {stem}, {name}, {source} (and those of earlier outputs,
    when `values` has them) into each argument.

    A file name can never become an option: when an argument that did not start with "-"
    would start with "-" after filling in, it is given a "./" prefix.
    """
    argv = [template[0]]
    for arg in template[1:]:
        # One pass: a value that holds "{srt}" (a file name can) is not filled in again.
        filled = _PLACEHOLDER.sub(lambda m: values.get(m[1], m[0]), arg)
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
        await asyncio.to_thread(out_dir.mkdir)
        values = {
            "input": str(ctx.input.absolute()), "output_dir": str(out_dir.absolute()),
            "stem": ctx.job.stem, "name": ctx.job.filename,
            "source": str(ctx.source.absolute()),
            **output_values(self.template, ctx.job.stem, ctx.artifacts),
        }
        if "outputs_dir" in used_placeholders(self.template):
            earlier = await asyncio.to_thread(gather_outputs, ctx.artifacts,
                                              ctx.workdir / EARLIER)
            values["outputs_dir"] = str(earlier.absolute())
        argv = render_argv(self.template, values)
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
