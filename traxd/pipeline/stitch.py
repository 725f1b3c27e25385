"""Joining the transcripts of two chunks that overlap in time, so that no word at the cut is
lost or doubled: the words both chunks heard are lined up by their text, and each is kept
once; where the texts share nothing, each chunk keeps the words on its side of the middle."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from difflib import SequenceMatcher

from traxd.pipeline.formats import Segment, TimedWord, Transcript, merge

MIN_MATCH = 2  # words in common that show where the two texts meet
NEAR = 1.0  # seconds around the overlap whose words may take part (their times are guesses)


@dataclass(frozen=True)
class Word:
    text: str
    start: float
    end: float
    segment: int  # index of its segment in the list it came from

    @property
    def key(self) -> str:
        return re.sub(r"[^\w']", "", self.text.lower())

    @property
    def middle(self) -> float:
        return (self.start + self.end) / 2


def words_of(segments: Sequence[Segment]) -> list[Word]:
    """The words of segments, each with a time guessed from its place in the segment's text
    (in proportion to the characters before it)."""
    out = []
    for index, segment in enumerate(segments):
        parts = segment.text.split()
        total = sum(len(p) + 1 for p in parts) or 1
        span = max(0.0, segment.end - segment.start)
        done = 0
        for part in parts:
            start = segment.start + span * done / total
            done += len(part) + 1
            out.append(Word(part, start, segment.start + span * done / total, index))
    return out


def stitch(left: Sequence[Segment], right: Sequence[Segment], lo: float,
           hi: float) -> list[Segment]:
    """The segments of two chunks whose audio overlaps in [lo, hi] (times on the same clock),
    as one list with each word once."""
    left_keep = [s for s in left if s.end <= lo - NEAR]
    left_tail = [s for s in left if s.end > lo - NEAR]
    right_head = [s for s in right if s.start < hi + NEAR]
    right_rest = [s for s in right if s.start >= hi + NEAR]
    ours, theirs = words_of(left_tail), words_of(right_head)
    # Only words near the overlap are lined up; those before it are ours, after it theirs.
    before = sum(1 for w in ours if w.middle < lo - NEAR)
    after = sum(1 for w in theirs if w.middle <= hi + NEAR)
    keep, first = _meeting(ours[before:], theirs[:after], (lo + hi) / 2)
    ending = _rebuild(left_tail, ours[:before + keep], keep_start=True)
    beginning = _rebuild(right_head, theirs[first:], keep_start=False)
    if ending and beginning and ending[-1].end > beginning[0].start:  # guessed word times
        last = ending[-1]
        ending[-1] = replace(last, end=max(last.start, beginning[0].start))
    return [*left_keep, *ending, *beginning, *right_rest]


def _meeting(ours: Sequence[Word], theirs: Sequence[Word], middle: float) -> tuple[int, int]:
    """(how many of our words to keep, the first of theirs to keep)."""
    matcher = SequenceMatcher(None, [w.key for w in ours], [w.key for w in theirs],
                              autojunk=False)
    match = matcher.find_longest_match(0, len(ours), 0, len(theirs))
    if match.size >= min(MIN_MATCH, len(ours), len(theirs)) and match.size > 0:
        return match.a, match.b
    keep = sum(1 for w in ours if w.middle < middle)
    return keep, next((i for i, w in enumerate(theirs) if w.middle >= middle), len(theirs))


def _rebuild(segments: Sequence[Segment], kept: Sequence[Word],
             keep_start: bool) -> list[Segment]:
    """The segments with only the kept words: whole ones unchanged, cut ones shortened at
    the end (left of the cut) or at the start (right of it)."""
    out = []
    for index, segment in enumerate(segments):
        mine = [w for w in kept if w.segment == index]
        if not mine:
            continue
        if len(mine) == len(segment.text.split()):
            out.append(segment)
            continue
        text = " ".join(w.text for w in mine)
        if keep_start:
            timed = tuple(w for w in segment.words if w.start < mine[-1].end)
            out.append(replace(segment, text=text, end=mine[-1].end, words=timed))
        else:
            timed = tuple(w for w in segment.words if w.end > mine[0].start)
            out.append(replace(segment, text=text, start=mine[0].start, words=timed))
    return out


OVERLAP_MIN = 0.1  # seconds of overlap below which chunks simply follow each other


def merge_chunks(parts: Sequence[tuple[float, Transcript]], *, duration: float) -> Transcript:
    """One transcript from chunk transcripts, each shifted by its chunk's start offset;
    where a chunk began before the one before it ended (a cut with no pause was
    overlapped), the two are stitched. A part's `duration` is its chunk's length."""
    segments: list[Segment] = []
    end = 0.0
    for offset, part in parts:
        shifted = [s.shifted(offset) for s in part.segments]
        if end - offset > OVERLAP_MIN and segments:
            segments = stitch(segments, shifted, offset, end)
        else:
            segments.extend(shifted)
        end = max(end, offset + part.duration)
    merged = merge(parts, duration=duration)
    return replace(merged, segments=tuple(segments))


# --- segments that span a silence -----------------------------------------------------------

WORD_GAP = 2.0  # seconds of silence between two timed words that end a segment
UNSPACED = frozenset({"zh", "ja", "th", "lo", "km", "my", "yue"})  # words written without spaces


def split_at_silences(transcript: Transcript, gap: float = WORD_GAP) -> Transcript:
    """Segments cut where their timed words are `gap` seconds or more apart. With the VAD
    filter, the model hears the speech with the silences between taken out, so one segment
    may hold the end of one passage and the start of the next, a minute later; its words
    keep their times on the source's clock, and so do the segments made from them."""
    joiner = "" if (transcript.language or "") in UNSPACED else " "
    segments: list[Segment] = []
    for segment in transcript.segments:
        runs = _runs(segment.words, gap)
        if len(runs) < 2:
            segments.append(segment)
            continue
        segments.extend(replace(segment, start=run[0].start, end=run[-1].end, words=tuple(run),
                                text=joiner.join(w.word for w in run)) for run in runs)
    return replace(transcript, segments=tuple(segments))


def _runs(words: Sequence[TimedWord], gap: float) -> list[list[TimedWord]]:
    runs: list[list[TimedWord]] = []
    for word in words:
        if runs and word.start - runs[-1][-1].end < gap:
            runs[-1].append(word)
        else:
            runs.append([word])
    return runs
