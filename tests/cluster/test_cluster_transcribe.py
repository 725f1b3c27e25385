"""A local-backend transcription (the real tiny.en model) runs on a worker."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.cluster.kit import RedisServer, Site, make_site
from tests.faults.kit import log_events
from tests.helpers import files_under
from tests.media.helpers import wer

pytestmark = [pytest.mark.slow, pytest.mark.integration]

TEXT = "Please remember to bring your notes to the meeting."


def test_local_transcription_runs_on_a_worker(
        short_root: Path, redis_server: RedisServer, site_factory: list[Site]) -> None:
    site = make_site(site_factory, short_root, redis_server, ["preprocess", "transcribe"],
                     transcribe={"backend": "local", "model": "tiny.en", "language": "en",
                                 "processes": 1},
                     daemon={"step_timeout": "5m"})
    worker = site.worker()
    site.daemon.start()
    speech = short_root / "speech.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(speech), TEXT],
                   check=True)
    speech.rename(site.box.inbox / "speech.wav")
    site.wait_done(["speech.wav"], timeout=240)
    assert {"speech.txt", "speech.json"} <= set(files_under(site.box.outputs))
    text = (site.box.outputs / "speech.txt").read_text()
    assert wer(TEXT, text) <= 0.25, text
    assert [e["step"] for e in worker.events_named("step_replied")] == ["preprocess",
                                                                       "transcribe"]
    assert "step_started" not in [e.get("event") for e in log_events(site.daemon.log)]
