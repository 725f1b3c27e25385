"""Which audio track of a file to transcribe, and ISO 639 language codes for choosing it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# ISO 639-1 (what whisper and `transcribe.language` use) -> the ISO 639-2 codes containers
# tag streams with: the bibliographic (B) form first where it differs from the terminology (T).
_ISO639 = """
af:afr am:amh ar:ara as:asm az:aze ba:bak be:bel bg:bul bn:ben bo:tib,bod br:bre bs:bos
ca:cat cs:cze,ces cy:wel,cym da:dan de:ger,deu el:gre,ell en:eng es:spa et:est eu:baq,eus
fa:per,fas fi:fin fo:fao fr:fre,fra gl:glg gu:guj ha:hau he:heb hi:hin hr:hrv ht:hat hu:hun
hy:arm,hye id:ind is:ice,isl it:ita ja:jpn jw:jav jv:jav ka:geo,kat kk:kaz km:khm kn:kan ko:kor
la:lat lb:ltz ln:lin lo:lao lt:lit lv:lav mg:mlg mi:mao,mri mk:mac,mkd ml:mal mn:mon mr:mar
ms:may,msa mt:mlt my:bur,mya ne:nep nl:dut,nld nn:nno no:nor,nob oc:oci pa:pan pl:pol ps:pus
pt:por ro:rum,ron ru:rus sa:san sd:snd si:sin sk:slo,slk sl:slv sn:sna so:som sq:alb,sqi
sr:srp su:sun sv:swe sw:swa ta:tam te:tel tg:tgk th:tha tk:tuk tl:tgl,fil tr:tur tt:tat
uk:ukr ur:urd uz:uzb vi:vie yi:yid yo:yor yue:yue zh:chi,zho
"""
ISO639_2 = {one: tuple(three.split(",")) for one, _, three in
            (pair.partition(":") for pair in _ISO639.split())}


def language_codes(language: str) -> frozenset[str]:
    """Every tag a stream in `language` (639-1 or 639-2, any case) may carry."""
    code = language.strip().lower()
    codes = {code}
    for one, threes in ISO639_2.items():
        if code == one or code in threes:
            codes.update((one, *threes))
    return frozenset(codes)


@dataclass(frozen=True)
class Track:
    """What choosing needs of an audio stream."""

    index: int  # the stream's index in the file
    language: str | None  # its language tag, as the container gives it
    default: bool  # disposition default


@dataclass(frozen=True)
class Choice:
    index: int  # the stream's index in the file
    position: int  # its place among the audio streams (0: the first)
    why: str  # "language", "default", "first" or "only"


def choose_track(tracks: Sequence[Track], language: str | None) -> Choice:
    """The track in the configured language, else the one marked default, else the first.

    The language is the user's own choice for this file, so it wins over the container's
    default (a film with an English default track and a German one, in a German inbox).
    """
    if not tracks:
        raise ValueError("no audio tracks to choose from")
    if len(tracks) == 1:
        return Choice(tracks[0].index, 0, "only")
    if language:
        codes = language_codes(language)
        for position, track in enumerate(tracks):
            if track.language and track.language.lower() in codes:
                return Choice(track.index, position, "language")
    for position, track in enumerate(tracks):
        if track.default:
            return Choice(track.index, position, "default")
    return Choice(tracks[0].index, 0, "first")
