"""The `enhance` step: an LLM restores punctuation, casing and paragraphs, word for word.

Long transcripts go in overlapping windows; each answer is checked against its input
(a guard on the words) and the pieces are stitched at the middle of each overlap. The
guard rejects a window whose words changed too much, that gained more than a few words,
or that gained a run of words (text the model wrote, e.g. an injected instruction); the
raw words are kept there and `<stem>.warnings.json` says so.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from openai import AsyncOpenAI

from traxd.config import EnhanceSettings, Settings
from traxd.errors import Permanent
from traxd.pipeline.base import StepContext, StepResult
from traxd.pipeline.formats import (
    WARNINGS_FACT,
    Transcript,
    file_warning,
    write_warnings,
)
from traxd.pipeline.openai_api import OpenAIEndpoint, UnusableAnswer, excerpt
from traxd.pipeline.tasks import gather_all

PARAGRAPH = "\n\n"  # a token of its own between paragraphs
MAX_NEW_RUN = 6  # words in a row that the source lacks: more is text the model wrote
MAX_ADDED_SHARE = 0.03  # of a window's words: more added words is not punctuation work
MIN_ADDED_LIMIT = 3  # added words always allowed ("alright" -> "all right")
_REASONING = re.compile(r"<(think|thinking|reasoning)>.*?(</\1>|\Z)", re.DOTALL | re.IGNORECASE)
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


def strip_reasoning(text: str) -> str:
    """The answer without `<think>...</think>` blocks (an unclosed one runs to the end)."""
    return _REASONING.sub("", text)


def additions(before: Sequence[str], after: Sequence[str]) -> tuple[int, list[str]]:
    """Words of `after` that `before` does not have: how many, and the longest run of them
    (a run is a stretch of new words between two words both texts share)."""
    a = [w for _, w in words_of(before)]
    edited = [t for t in after if t != PARAGRAPH and normalise(t)]
    b = [normalise(t) for t in edited]
    added, longest = 0, (0, 0)
    matcher = difflib.SequenceMatcher(None, a, b, autojunk=False)
    for tag, _, _, j1, j2 in matcher.get_opcodes():
        if tag in ("insert", "replace"):
            added += j2 - j1
            longest = max(longest, (j1, j2), key=lambda span: span[1] - span[0])
    return added, edited[longest[0]:longest[1]]


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
    problem: str | None = None  # why the edit was rejected; None: accepted

    @property
    def accepted(self) -> bool:
        return self.problem is None


class EnhanceStep:
    """Chat completions over the transcript's text, guarded, into `<stem>.enhanced.md`."""

    name = "enhance"
    needs_workdir = True

    def __init__(self, settings: Settings) -> None:
        self.whole = settings
        self.settings: EnhanceSettings = settings.enhance
        self._others: dict[EnhanceSettings, EnhanceStep] = {}  # inboxes' own [inbox.enhance]
        self.api = OpenAIEndpoint(
            backend="enhance", base_url=self.settings.base_url,
            api_key_env=self.settings.api_key_env, api_key_file=self.settings.api_key_file,
            timeout=self.settings.timeout,
            requests_per_minute=self.settings.requests_per_minute,
            max_concurrent=self.settings.max_concurrent,
            stall_seconds=settings.daemon.stall_seconds)

    async def run(self, ctx: StepContext) -> StepResult:
        if ctx.settings.enhance != self.settings:  # the inbox has its own [inbox.enhance]
            return await self._for(ctx.settings.enhance).run(ctx)
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
        answer = tokenise(strip_reasoning(await self.api.call(self._request(" ".join(source)))))
        change = change_ratio(source, answer)
        tick()
        keep = (window.keep_from - window.start, window.keep_to - window.start)
        if problem := self.judge(source, answer, change):
            ctx.log.warning("enhancement_rejected", words=f"{window.start}-{window.end}",
                            change=round(change, 3), problem=problem)
            return Edited(source[keep[0]:keep[1]], change, problem)
        return Edited(answer[locate(source, answer, keep[0]):locate(source, answer, keep[1])],
                      change)

    def judge(self, source: Sequence[str], answer: Sequence[str], change: float) -> str | None:
        """What is wrong with an edited window, or None when it is only an edit."""
        limit = self.settings.max_change_ratio
        if change > limit:
            return f"changed {change:.0%} of its words (limit {limit:.0%})"
        added, run = additions(source, answer)
        if len(run) > MAX_NEW_RUN:
            shown = " ".join(run[:12]) + (" ..." if len(run) > 12 else "")
            return f"added {len(run)} words in a row that were not said ({shown!r})"
        allowed = max(MIN_ADDED_LIMIT, int(MAX_ADDED_SHARE * len(source)))
        if added > allowed:
            return f"added {added} words that were not said (limit {allowed})"
        return None

    def _request(self, text: str) -> Callable[[AsyncOpenAI], Awaitable[str]]:
        model = self.settings.model

        async def request(client: AsyncOpenAI) -> str:
            response = await client.chat.completions.create(
                model=model, temperature=0,
                messages=[{"role": "system", "content": SYSTEM_PROMPT},
                          {"role": "user", "content": text}])
            return answer_text(response)

        return request

    def _publish(self, ctx: StepContext, edited: Sequence[Edited],
                 words: Sequence[str]) -> StepResult:
        out = ctx.workdir / "out"
        out.mkdir(exist_ok=True)
        path = out / f"{ctx.job.stem}.enhanced.md"
        text = detokenise([t for part in edited for t in part.tokens])
        path.write_text(text + "\n" if text else "", encoding="utf-8")
        rejected = [i for i, part in enumerate(edited) if not part.accepted]
        warnings = [f"window {i + 1} of {len(edited)} {edited[i].problem}: kept the raw text"
                    for i in rejected]
        file_warnings = [*(dict(w) for w in ctx.facts.get(WARNINGS_FACT) or ()), *(
            file_warning(self.name, "enhancement_rejected", f"enhancement: {w}")
            for w in warnings)]
        if not words:
            warnings.append("empty transcript: nothing to enhance")
        facts = {"enhanced": len(rejected) < len(edited), "enhance_model": self.settings.model,
                 "enhance_windows": len(edited), "enhance_warnings": warnings}
        artifacts = {path.name: path}
        if rejected:  # in a file beside the text, not only in the log
            artifacts.update(write_warnings(out, ctx.job.stem, ctx.job.name, file_warnings))
            facts[WARNINGS_FACT] = file_warnings
        return StepResult(artifacts=artifacts, facts=facts)

    def _for(self, settings: EnhanceSettings) -> EnhanceStep:
        """The step (and API client) for other enhance settings, made once."""
        if settings not in self._others:
            self._others[settings] = EnhanceStep(replace(self.whole, enhance=settings))
        return self._others[settings]

    async def aclose(self) -> None:
        others, self._others = list(self._others.values()), {}
        for other in others:
            await other.aclose()
        await self.api.aclose()


def answer_text(response: object) -> str:
    """The text of a chat completion; UnusableAnswer for anything else (an HTML page)."""
    if isinstance(response, str):  # the client hands back the text of a non-JSON answer
        raise UnusableAnswer(f"not JSON: {excerpt(response)!r}")
    choices = getattr(response, "choices", None)
    if not isinstance(choices, list) or not choices:
        raise UnusableAnswer("no choices in the answer")
    content = getattr(getattr(choices[0], "message", None), "content", None)
    if not isinstance(content, str):
        raise UnusableAnswer("the answer has no message content")
    return content


def load_text(ctx: StepContext) -> str:
    """The transcript's text, from the json that transcribe left in the facts."""
    where = ctx.facts.get("transcript")
    if not where or not Path(where).is_file():
        raise Permanent("enhance needs a transcript: put 'transcribe' before 'enhance' in "
                        "the pipeline", reason="no_transcript")
    return Transcript.load(Path(where)).text
