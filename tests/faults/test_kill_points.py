"""Crash consistency: SIGKILL a real `traxd run` at random moments, over and over, then let
it finish; every file must end exactly once in done/ or failed/ with one set of outputs."""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.faults.kit import (
    OUTPUT_EXTS,
    Box,
    FaultDaemon,
    Tally,
    check_exactly_once,
    classify_kill,
    log_events,
    multi_copy_step,
    read_jobs,
    wait_all_settled,
    wait_for_orphans,
)
from tests.helpers import (
    base_daemon,
    copy_step,
    files_under,
    running_daemon,
    wait_until,
    write_config,
)
from traxd.intake import sha256_file
from traxd.journal import Journal

pytestmark = [pytest.mark.faults, pytest.mark.timeout(400)]

MIN_KILLS = 100
KILL_BUDGET = 135.0  # seconds for the kill loop; the whole test stays under 2.5 minutes
PENDING_TARGET = 16  # keep about this many files waiting, so that a kill finds work
BATCH = 8  # files dropped at a time
FAIL_SHARE = 0.1  # files whose step fails by design
SLOW_SHARE = 0.25  # runs with a slower step (0.15 s), so that kills land inside steps
STARTUP_SHARE = 0.08  # kills during start-up recovery, before "ready"
BURST_SHARE = 0.15  # runs that get a burst of files and many workers: batched claims, finishes
BURST = 40


def seed() -> int:
    value = os.environ.get("TRAXD_FAULT_SEED")
    return int(value) if value else random.SystemRandom().randrange(1 << 32)


def configs(tmp: Path, box: Box, ledger: Path) -> tuple[Path, Path, Path]:
    def config(name: str, delay: float, workers: int = 3) -> Path:
        return write_config(tmp / name, base_daemon(
            tmp, workers=workers, settle_seconds=0.05, batch_interval="0.1s",
            retry_backoff="0.1s", retry_backoff_max="0.5s", reconcile_interval="1s"), [{
                "name": "main", "path": str(box.inbox),
                "pipeline": [{"command": multi_copy_step(ledger, delay)}]}])

    return config("fast.toml", 0.0), config("slow.toml", 0.15), config("burst.toml", 0.0, 16)


def ledger_counts(ledger: Path) -> Counter[str]:
    return Counter(ledger.read_text().split()) if ledger.exists() else Counter()


def test_sigkill_at_random_points_loses_nothing_and_repeats_nothing(
        tmp_path: Path, tally: Tally) -> None:
    # Given an inbox with a copy step that counts its runs in a ledger, and a seeded RNG
    rng_seed = seed()
    tally.seeds.append(rng_seed)
    print(f"kill test seed: {rng_seed} (set TRAXD_FAULT_SEED to repeat)")
    rng = random.Random(rng_seed)
    box = Box(tmp_path / "box").make()
    state = tmp_path / "state"
    ledger = tmp_path / "ledger"
    fast, slow, burst = configs(tmp_path, box, ledger)
    good: dict[str, bytes] = {}
    bad: set[str] = set()
    done_at_kill: dict[str, int] = {}  # file -> ledger count when first seen in done/
    phases: Counter[str] = Counter()
    batched: Counter[str] = Counter()  # kills that caught several jobs in one phase
    crashes: list[str] = []

    def drop(count: int) -> None:
        for _ in range(count):
            name = f"f{len(good) + len(bad):04d}.mp3"
            failing = rng.random() < FAIL_SHARE
            content = (b"FAIL" if failing else b"GOOD") + name.encode() + rng.randbytes(
                rng.randrange(1 << 10, 1 << 16))
            (box.inbox / name).write_bytes(content)
            if failing:
                bad.add(name)
            else:
                good[name] = content

    # When the daemon is started and SIGKILLed at a random moment, again and again
    started = time.monotonic()
    cycle = 0
    while cycle < MIN_KILLS or not hit_every_phase(phases):
        if time.monotonic() - started > KILL_BUDGET:
            break
        cycle += 1
        config = slow if rng.random() < SLOW_SHARE else fast
        if rng.random() < BURST_SHARE:
            drop(BURST)
            config = burst
        elif len(files_under(box.inbox)) + len(files_under(box.processing)) < PENDING_TARGET:
            drop(BATCH)
        daemon = FaultDaemon(config, tmp_path / "logs" / f"{cycle:03d}.log")
        (tmp_path / "logs").mkdir(exist_ok=True)
        daemon.spawn()
        if rng.random() < STARTUP_SHARE:
            time.sleep(rng.uniform(0.1, 0.6))  # the scenario: a kill at a random moment
        else:
            wait_until(daemon.ready_or_dead, 30, interval=0.02, message="daemon ready")
            if rng.random() < 0.5:
                drop(2)  # files arriving while it runs go through the watcher
            time.sleep(rng.uniform(0.1, 0.6))  # the scenario: a kill at a random moment
        if not daemon.alive():
            crashes.append(f"cycle {cycle}: exited by itself\n{daemon.log_text()[-3000:]}")
            continue
        ready = daemon.is_ready()
        daemon.kill()
        phase, in_phase = classify_kill(state, box, steps=1) if ready else ("startup", Counter())
        phases[phase] += 1
        tally.kills[phase] += 1
        batched.update(p for p, n in in_phase.items() if n > 1 and p in BATCHED_PHASES)
        tally.orphans_waited += wait_for_orphans(str(ledger))
        counts = ledger_counts(ledger)
        for name in files_under(box.done):
            done_at_kill.setdefault(name, counts[name])

    # Then a last run finishes everything, and a SIGTERM stops it cleanly
    final = FaultDaemon(fast, tmp_path / "logs" / "final.log").spawn()
    wait_until(final.is_ready, 30, message="final daemon ready")
    wait_all_settled(box, len(good) + len(bad), 120)
    assert final.terminate() == 0
    tally.files_dropped += len(good) + len(bad)
    print(f"kills: {sum(phases.values())} in {time.monotonic() - started:.0f} s: "
          f"{dict(phases)}; files: {len(good)} good, {len(bad)} failing by design")

    unexpected = [f"{log.name}: {e['event']}: {e.get('error')}"
                  for log in sorted((tmp_path / "logs").iterdir()) for e in log_events(log)
                  if e["event"] in ("job_error", "job_crashed")]
    verdict = check_exactly_once(box, state, good, bad, OUTPUT_EXTS)
    counts = ledger_counts(ledger)
    rerun = sorted(n for n, seen in done_at_kill.items() if counts[n] != seen)
    left_done = sorted(n for n in done_at_kill if n not in files_under(box.done))
    tally.files_lost += len(verdict.lost)
    tally.processed_twice += len(set(verdict.twice) | set(rerun))
    tally.daemon_crashes += len(crashes)
    assert not crashes, crashes[0]
    assert unexpected == [], f"unexpected errors (seed {rng_seed}): {unexpected[:5]}"
    assert verdict.lost == [], f"lost (seed {rng_seed}): {verdict.lost}"
    assert verdict.twice == [], f"extra outputs (seed {rng_seed}): {verdict.twice}"
    assert rerun == [], f"step re-ran after the file was done (seed {rng_seed}): {rerun}"
    assert left_done == [], f"left done/ again (seed {rng_seed}): {left_done}"
    assert verdict.problems == [], f"seed {rng_seed}: {verdict.problems}"
    assert all(counts[n] >= 1 for n in good)
    assert sum(phases.values()) >= MIN_KILLS, f"only {sum(phases.values())} kills in budget"
    assert hit_every_phase(phases), f"phases hit (seed {rng_seed}): {dict(phases)}"
    tally.batched.update(batched)
    assert batched, f"no kill caught a batched claim or finish (seed {rng_seed})"


BATCHED_PHASES = ("claim", "publish/write", "move")


def hit_every_phase(phases: Counter[str]) -> bool:
    return (phases["claim"] + phases["step"] > 0 and phases["publish/write"] > 0
            and phases["move"] > 0)


def test_a_claim_cut_short_is_finished_by_its_own_job(tmp_path: Path, tally: Tally) -> None:
    # Given the state a SIGKILL (or a rename that failed and waits for its retry) leaves
    # between writing a job's processing/ path into the journal and renaming the file:
    # the journal says "claimed", the file is still in the inbox, the job waits to retry
    box = Box(tmp_path / "box").make()
    state, ledger = tmp_path / "state", tmp_path / "ledger"
    config = write_config(tmp_path / "traxd.toml", base_daemon(tmp_path, settle_seconds=0.05), [{
        "name": "main", "path": str(box.inbox), "pipeline": [{"command": copy_step(ledger)}]}])
    source = box.inbox / "cut.mp3"
    source.write_bytes(b"cut short")
    info = source.stat()
    journal = Journal.open(state / "journal.sqlite3")
    job = journal.add_seen("main", "cut.mp3", info.st_size, info.st_mtime_ns, 5)
    job = journal.queue(job, sha256_file(source), info.st_size, info.st_mtime_ns)
    job = journal.start(job, str(box.processing / "cut.mp3"))
    journal.retry(job, not_before=time.time() + 2.0)
    journal.close()
    tally.constructed.append("claim written, rename not done")
    tally.files_dropped += 1

    # When the daemon starts, finds the file in its inbox, and the job's retry comes due
    with running_daemon(config, tmp_path / "log") as daemon:
        wait_until(lambda: files_under(box.done) == ["cut.mp3"], 30, message="cut.mp3 done")
        wait_until(lambda: all(r["state"] in ("done", "failed") for r in read_jobs(state)), 10,
                   message="every job finished")
        assert daemon.terminate() == 0

    # Then the job that began the claim finishes it: one row, one run, no false failure
    rows = read_jobs(state)
    twice = ledger.read_text().split().count("cut.mp3") - 1
    tally.processed_twice += max(twice, 0)
    assert [(r["id"], r["state"]) for r in rows] == [(job.id, "done")]
    assert files_under(box.failed) == []
    assert files_under(box.outputs) == ["cut.txt"]
    assert twice == 0
