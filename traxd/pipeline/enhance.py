"""The `enhance` step: an LLM restores punctuation, casing and paragraphs, word for word.

Long transcripts go in overlapping windows; each answer is checked against its input
(a guard on the words) and the pieces are stitched at the middle of each overlap.
"""

from __future__ import annotations

import difflib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from openai import AsyncOpenAI

from traxd.config import EnhanceSettings, Settings
from traxd.errors import Permanent
from traxd.pipeline.base import StepContext, StepResult
from traxd.pipeline.formats import Transcript
from traxd.pipeline.openai_api import OpenAIEndpoint
from traxd.pipeline.tasks import gather_all

PARAGRAPH = "\n\n"  # a token of its own between paragraphs
SYSTEM_PROMPT = (
    "You edit raw speech transcripts. Restore punctuation, capitalisation and paragraph "
    "breaks. Do not add, remove, reorder, translate or correct any word. Separate "
    "paragraphs with one blank line. Answer with the edited text only."
)


def normalise(word: str) -> str:
    return "".join(ch for ch in word.casefold() if ch.isalnum())


def tokenise(text: str) -> list[str]:
    """Words as written, with PARAGRAPH tokens where blank lines separate paragraphs."""
    tokens: list[str] = []
    for paragraph in text.replace("\r\n", "\n").split("\n\n"):
        words = paragraph.split()
        if words:
            tokens.extend([PARAGRAPH, *words] if tokens else words)
    return tokens


def detokenise(tokens: Sequence[str]) -> str:
    paragraphs: list[list[str]] = [[]]
    for token in tokens:
        if token == PARAGRAPH:
            paragraphs.append([])
        else:
            paragraphs[-1].append(token)
    return "\n\n".join(" ".join(p) for p in paragraphs if p)


def words_of(tokens: Sequence[str]) -> list[tuple[int, str]]:
    """(token index, normalised word) of every token that holds a word."""
    return [(i, n) for i, t in enumerate(tokens) if t != PARAGRAPH and (n := normalise(t))]


def change_ratio(before: Sequence[str], after: Sequence[str]) -> float:
    """Share of words changed: 1 - words kept in order / words in the longer text;
    0 for the same words, 1/3 when a third is dropped, 1 when nothing is in common."""
    a = [w for _, w in words_of(before)]
    b = [w for _, w in words_of(after)]
    if not a and not b:
        return 0.0
    blocks = difflib.SequenceMatcher(None, a, b, autojunk=False).get_matching_blocks()
    return 1.0 - sum(block.size for block in blocks) / max(len(a), len(b))


def locate(source: Sequence[str], tokens: Sequence[str], k: int) -> int:
    """Index in the edited tokens where the text of source word k begins."""
    if k <= 0:
        return 0
    if k >= len(source):
        return len(tokens)
    edited = words_of(tokens)
    matcher = difflib.SequenceMatcher(None, [normalise(w) for w in source],
                                      [w for _, w in edited], autojunk=False)
    for a, b, size in matcher.get_matching_blocks():
        if a + size > k:
            j = b + max(0, k - a)
            return edited[j][0] if j < len(edited) else len(tokens)
    return len(tokens)


@dataclass(frozen=True)
class Window:
    start: int  # source word indices [start, end)
    end: int
    keep_from: int  # the part of the window that goes into the result
    keep_to: int


def plan_windows(count: int, size: int, overlap: int) -> list[Window]:
    """Windows of `size` words overlapping by `overlap`; each keeps its words up to the
    middle of the overlap with the next."""
    overlap = min(overlap, size // 2)
    bounds: list[tuple[int, int]] = []
    start = 0
    while True:
        end = min(start + size, count)
        bounds.append((start, end))
        if end >= count:
            break
        start = end - overlap
    cuts = [0, *(s + overlap // 2 for s, _ in bounds[1:]), count]
    return [Window(s, e, cuts[i], cuts[i + 1]) for i, (s, e) in enumerate(bounds)]


@dataclass(frozen=True)
class Edited:
    tokens: list[str]  # the kept part of the window, edited or raw
    change: float
    accepted: bool


class EnhanceStep:
    """Chat completions over the transcript's text, guarded, into `<stem>.enhanced.md`."""

    name = "enhance"
    needs_workdir = True

    def __init__(self, settings: Settings) -> None:
        self.settings: EnhanceSettings = settings.enhance
        self.api = OpenAIEndpoint(
            backend="enhance", base_url=self.settings.base_url,
            api_key_env=self.settings.api_key_env, timeout=self.settings.timeout,
            requests_per_minute=self.settings.requests_per_minute,
            max_concurrent=self.settings.max_concurrent)

    async def run(self, ctx: StepContext) -> StepResult:
        ctx = replace(ctx, log=ctx.log.bind(provider=self.api.provider, model=self.settings.model))
        words = load_text(ctx).split()
        windows = plan_windows(len(words), self.settings.window_words,
                               self.settings.overlap_words) if words else []
        finished = 0

        def tick() -> None:
            nonlocal finished
            finished += 1
            ctx.progress(finished / len(windows))

        edited = await gather_all(self._edit(words, w, ctx, tick) for w in windows)
        return self._publish(ctx, edited, words)

    async def _edit(self, words: Sequence[str], window: Window, ctx: StepContext,
                    tick: Callable[[], None]) -> Edited:
        source = list(words[window.start:window.end])
        answer = tokenise(await self.api.call(self._request(" ".join(source))))
        change = change_ratio(source, answer)
        tick()
        keep = (window.keep_from - window.start, window.keep_to - window.start)
        if change > self.settings.max_change_ratio:
            ctx.log.warning("enhancement_rejected", words=f"{window.start}-{window.end}",
                            change=round(change, 3), limit=self.settings.max_change_ratio)
            return Edited(source[keep[0]:keep[1]], change, accepted=False)
        return Edited(answer[locate(source, answer, keep[0]):locate(source, answer, keep[1])],
                      change, accepted=True)

    def _request(self, text: str) -> Callable[[AsyncOpenAI], Awaitable[str]]:
        model = self.settings.model

        async def request(client: AsyncOpenAI) -> str:
            response = await client.chat.completions.create(
                model=model, temperature=0,
                messages=[{"role": "system", "content": SYSTEM_PROMPT},
                          {"role": "user", "content": text}])
            choices = response.choices or []
            return (choices[0].message.content or "") if choices else ""

        return request

    def _publish(self, ctx: StepContext, edited: Sequence[Edited],
                 words: Sequence[str]) -> StepResult:
        out = ctx.workdir / "out"
        out.mkdir(exist_ok=True)
        path = out / f"{ctx.job.stem}.enhanced.md"
        text = detokenise([t for part in edited for t in part.tokens])
        path.write_text(text + "\n" if text else "", encoding="utf-8")
        rejected = [i for i, part in enumerate(edited) if not part.accepted]
        warnings = [f"window {i + 1} of {len(edited)} changed {edited[i].change:.0%} of its "
                    f"words (limit {self.settings.max_change_ratio:.0%}): kept the raw text"
                    for i in rejected]
        if not words:
            warnings.append("empty transcript: nothing to enhance")
        facts = {"enhanced": len(rejected) < len(edited), "enhance_model": self.settings.model,
                 "enhance_windows": len(edited), "enhance_warnings": warnings}
        return StepResult(artifacts={path.name: path}, facts=facts)

    async def aclose(self) -> None:
        await self.api.aclose()


def load_text(ctx: StepContext) -> str:
    """The transcript's text, from the json that transcribe left in the facts."""
    where = ctx.facts.get("transcript")
    if not where or not Path(where).is_file():
        raise Permanent("enhance needs a transcript: put 'transcribe' before 'enhance' in "
                        "the pipeline", reason="no_transcript")
    return Transcript.load(Path(where)).text
