"""The `mux` step: the transcript's subtitles added as a track into a copy of the video.

Every stream of the original is copied as it is (no re-encode); the srt becomes one more
subtitle stream: `mov_text` in an mp4/m4v/mov (the only text subtitles those hold), SubRip
in a Matroska copy for any other container. The copy is an output like the others (named
`<stem>.mp4` or `<stem>.mkv`, published atomically into outputs/); a file without video
gets no copy.
"""

from __future__ import annotations

from pathlib import Path

from traxd.config import Settings
from traxd.errors import Permanent
from traxd.pipeline.base import StepContext, StepResult
from traxd.pipeline.ffmpeg import (
    GLOBAL_ARGS,
    LazyTools,
    MediaInfo,
    ProgressParser,
    failure,
    media_url,
    probe,
    run_tool,
)

MP4_FAMILY = (".mp4", ".m4v", ".mov")


def _pairs(text: str) -> dict[str, str]:
    return {key: value for key, _, value in (pair.partition(":") for pair in text.split())}


# Whisper's language codes (ISO 639-1, and `haw`, `yue`) as the ISO 639-2 codes containers
# store: mp4 takes the terminology form (`deu`), Matroska the bibliographic one (`ger`).
_TERMINOLOGY = _pairs(
    "af:afr am:amh ar:ara as:asm az:aze ba:bak be:bel bg:bul bn:ben bo:bod br:bre bs:bos "
    "ca:cat cs:ces cy:cym da:dan de:deu el:ell en:eng es:spa et:est eu:eus fa:fas fi:fin "
    "fo:fao fr:fra gl:glg gu:guj ha:hau haw:haw he:heb hi:hin hr:hrv ht:hat hu:hun hy:hye "
    "id:ind is:isl it:ita ja:jpn jw:jav ka:kat kk:kaz km:khm kn:kan ko:kor la:lat lb:ltz "
    "ln:lin lo:lao lt:lit lv:lav mg:mlg mi:mri mk:mkd ml:mal mn:mon mr:mar ms:msa mt:mlt "
    "my:mya ne:nep nl:nld nn:nno no:nor oc:oci pa:pan pl:pol ps:pus pt:por ro:ron ru:rus "
    "sa:san sd:snd si:sin sk:slk sl:slv sn:sna so:som sq:sqi sr:srp su:sun sv:swe sw:swa "
    "ta:tam te:tel tg:tgk th:tha tk:tuk tl:tgl tr:tur tt:tat uk:ukr ur:urd uz:uzb vi:vie "
    "yi:yid yo:yor zh:zho yue:yue")
_BIBLIOGRAPHIC = _pairs(
    "bod:tib ces:cze cym:wel deu:ger ell:gre eus:baq fas:per fra:fre hye:arm isl:ice kat:geo "
    "mri:mao mkd:mac msa:may mya:bur nld:dut ron:rum slk:slo sqi:alb zho:chi")


def container_language(language: str | None, *, mp4: bool) -> str | None:
    """The ISO 639-2 code for a transcript's language; None when it is not known."""
    code = _TERMINOLOGY.get(language or "")
    if code is None:
        return None
    return code if mp4 else _BIBLIOGRAPHIC.get(code, code)


def mux_argv(ffmpeg: str, source: Path, srt: Path, out: Path, *, subtitles_before: int,
             language: str | None) -> list[str]:
    """ffmpeg copying every stream of `source` but data ones (mp4 refuses most) and adding
    `srt` as the subtitle stream after the `subtitles_before` ones it has."""
    mp4 = out.suffix in MP4_FAMILY
    new = f"s:{subtitles_before}"
    argv = [ffmpeg, *GLOBAL_ARGS, "-y", "-i", media_url(source), "-i", media_url(srt),
            "-map", "0", "-map", "-0:d", "-map", "1", "-c", "copy",
            f"-c:{new}", "mov_text" if mp4 else "srt"]
    if (code := container_language(language, mp4=mp4)) is not None:
        argv += [f"-metadata:s:{new}", f"language={code}"]
    return [*argv, media_url(out)]


def copy_name(source: Path, stem: str) -> str:
    suffix = source.suffix.lower()
    return f"{stem}{suffix if suffix in MP4_FAMILY else '.mkv'}"


class MuxStep:
    """Adds the srt an earlier step wrote into a copy of the original video."""

    name = "mux"
    needs_workdir = True

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.tools = LazyTools()

    async def run(self, ctx: StepContext) -> StepResult:
        srt = ctx.artifacts.get(f"{ctx.job.stem}.srt")
        if srt is None:
            raise Permanent(f"mux adds {ctx.job.stem}.srt into the video, but no earlier step "
                            "wrote it (put transcribe before mux, with 'srt' in the inbox's "
                            "formats)", reason="mux")
        tools = self.tools.get()
        info = await probe(ctx.source, tools, ctx.limits)
        if not info.video:
            ctx.log.info("mux_skipped", why="no video stream")
            return StepResult()
        out = ctx.workdir / copy_name(ctx.source, ctx.job.stem)
        await self._mux(ctx, info, srt, out)
        return StepResult(artifacts={out.name: out})

    async def _mux(self, ctx: StepContext, info: MediaInfo, srt: Path, out: Path) -> None:
        argv = mux_argv(self.tools.get().ffmpeg, ctx.source, srt, out,
                        subtitles_before=info.subtitles, language=ctx.facts.get("language"))
        result = await run_tool(argv, ctx.limits,
                                on_line=ProgressParser(info.duration, ctx.progress))
        if result.returncode != 0:
            raise failure(result, "mux", ctx.job.filename)
        ctx.progress(1.0)

    async def aclose(self) -> None:
        return None
