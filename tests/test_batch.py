"""The Batch API path (embedpipe.batch) against the real loopback server: packing, vectors,
failures and resubmission, billing, and resuming after a kill."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from embedpipe._batch_plan import BatchState, input_file, plan_batches
from embedpipe.backends.hosted import HostedEmbedder
from embedpipe.batch import BatchStats, embed_with_batches, read_progress
from embedpipe.corpus import content_hash
from embedpipe.errors import BatchError, SovereigntyError
from embedpipe.profiles import Profile, fingerprint
from embedpipe.tokens import TokenCounter
from embedpipe.usage import UsageLedger
from embedpipe.vectors import VectorStore

from conftest import LOOPBACK_KEY, hosted_profile_toml, kill_9_once_batches_are_submitted

WORDS = "wing flap lift drag shock wave nozzle flow heat mach boundary layer".split()
FAST_POLL = "poll_initial_s = 0.01\npoll_max_s = 0.05\n"


def make_texts(n: int, long_every: int = 0) -> dict[str, str]:
    """``n`` distinct tiny texts (every ``long_every``-th one long enough to be chunked)."""
    out = {}
    for i in range(n):
        words = [WORDS[(i * 7 + k) % len(WORDS)] for k in range(3 + i % 4)]
        text = f"Text {i}: " + " ".join(words) + "."
        if long_every and i % long_every == 0:
            text = " ".join([text] * 8)
        out[content_hash(text)] = text
    return out


@pytest.fixture
def setup(make_settings, openai_server):
    """settings and profile for a hosted profile on the loopback server, with ``batch``
    and ``limits`` lines added to the profile's tables."""

    def make(batch: str = "", limits: str = "", extra: str = ""):
        toml = hosted_profile_toml(openai_server.base_url, limits=limits, extra=extra)
        settings = make_settings(toml + "[profiles.hosted.batch]\n" + FAST_POLL + batch)
        return settings, settings.profile("hosted")

    return make


def store_for(settings, profile: Profile) -> VectorStore:
    return VectorStore(settings.data_dir, fingerprint(profile), profile.dims, profile.name)


def run(settings, profile: Profile, texts: dict[str, str], **kw) -> BatchStats:
    return embed_with_batches(profile, texts, store_for(settings, profile), settings.data_dir / "batch.json",
                              UsageLedger(settings.data_dir), **kw)


def batch_ledger(settings) -> list:
    return [r for r in UsageLedger(settings.data_dir).records() if r.api == "batch"]


def test_packing_stays_within_every_limit_with_exact_token_counts(setup) -> None:
    _, profile = setup(
        batch="max_requests_per_file = 3\nmax_inputs_per_batch = 7\nmax_inputs_per_request = 3\n"
              "max_file_bytes = 1400\n",
        limits="max_request_tokens = 40\n", extra="max_tokens = 20\n")
    texts = make_texts(30, long_every=5)
    batches, refused = plan_batches(profile, texts, 1)
    assert refused == {} and len(batches) > 4
    counter, planned = TokenCounter(), []
    for b in batches:
        raw = input_file(profile, b, texts)
        lines = [json.loads(x) for x in raw.decode().splitlines()]
        assert len(raw) <= 1400 and len(lines) == len(b.requests) <= 3 and b.inputs <= 7
        for line, request in zip(lines, b.requests):
            inputs = line["body"]["input"]
            assert line["custom_id"] == request.custom_id and len(inputs) <= 3
            assert counter.count(inputs) == request.tokens  # exact, as the API counts them
            assert sum(request.tokens) <= 40 and max(request.tokens) <= 20
        planned += b.hashes
    assert sorted(planned) == sorted(texts)  # each text in exactly one batch, pieces together
    assert len({r.custom_id for b in batches for r in b.requests}) == sum(len(b.requests) for b in batches)


def test_packing_refuses_a_text_no_batch_can_hold(setup) -> None:
    _, profile = setup(batch="max_inputs_per_batch = 2\n", extra="max_tokens = 10\n")
    texts = make_texts(3) | {content_hash("x " * 60): "x " * 60}
    batches, refused = plan_batches(profile, texts, 1)
    assert list(refused) == [content_hash("x " * 60)]
    assert "do not fit one batch" in refused[content_hash("x " * 60)]
    assert sum(len(b.hashes) for b in batches) == 3


def test_batch_vectors_equal_the_synchronous_ones_and_the_ledger_bills_the_batch_price(
    setup, openai_server
) -> None:
    settings, profile = setup(batch="max_inputs_per_batch = 6\nmax_inputs_per_request = 2\n",
                              extra="max_tokens = 20\n")
    openai_server.configure(batch_max_inputs=6)  # the server enforces the same limit
    texts = make_texts(12, long_every=4)
    seen: list[list[str]] = []
    stats = run(settings, profile, texts, on_stored=seen.append)
    counters = openai_server.counters()
    assert stats.failed == {} and stats.stored == 12 and stats.chunked == 3
    assert stats.batches == counters["batches_created"] > 1 and stats.files == counters["files_uploaded"]
    assert sorted(h for hs in seen for h in hs) == sorted(texts)  # each text reported once
    stored = store_for(settings, profile).lookup(list(texts))
    sync = HostedEmbedder(profile).embed_documents(list(texts.values()))
    assert not sync.failed
    np.testing.assert_allclose(np.stack([stored[h] for h in texts]), sync.vectors, atol=1e-6)
    # The ledger holds exactly what the provider billed, at the batch price, marked batch.
    records = batch_ledger(settings)
    assert sum(r.tokens for r in records) == stats.tokens == counters["batch_tokens_billed"] > 0
    assert sum(r.requests for r in records) == counters["batch_lines_completed"]
    assert sum(r.usd for r in records) == pytest.approx(stats.tokens * 0.01 / 1e6)
    assert stats.usd == pytest.approx(stats.tokens * 0.01 / 1e6)
    # Files are cleaned up at the provider: inputs, outputs.
    assert counters["files_deleted"] == counters["files_uploaded"] + stats.batches


def test_texts_already_stored_are_never_submitted(setup, openai_server) -> None:
    settings, profile = setup()
    texts = make_texts(6)
    first = dict(list(texts.items())[:4])
    run(settings, profile, first)
    openai_server.reset_counters()
    stats = run(settings, profile, texts)
    assert (stats.skipped, stats.inputs, stats.stored) == (4, 2, 2)
    assert openai_server.counters()["batch_inputs_billed"] == 2
    assert run(settings, profile, texts).batches == 0  # all stored: nothing to submit


def test_failed_lines_are_resubmitted_then_stored(setup, openai_server) -> None:
    settings, profile = setup(batch="max_inputs_per_request = 1\n")
    openai_server.configure(batch_fail_rate=0.5, batch_faulty_batches=1)
    texts = make_texts(10)
    stats = run(settings, profile, texts)
    counters = openai_server.counters()
    assert counters["batch_lines_failed"] > 0 and counters["batches_created"] == 2
    assert stats.failed == {} and stats.stored == 10
    assert stats.resubmitted == counters["batch_lines_failed"]
    assert stats.attempts == {1: 10 - stats.resubmitted, 2: stats.resubmitted}
    assert len(store_for(settings, profile)) == 10
    assert sum(r.tokens for r in batch_ledger(settings)) == counters["batch_tokens_billed"]


@pytest.mark.parametrize(("knob", "status"), [("batch_expire_after_s", "expired"),
                                              ("batch_cancel_after_s", "cancelled")])
def test_an_expired_or_cancelled_batch_keeps_what_completed_and_resubmits_the_rest(
    setup, openai_server, knob, status
) -> None:
    settings, profile = setup(batch="max_inputs_per_request = 1\n")
    openai_server.configure(batch_delay_s=0.4, batch_faulty_batches=1, **{knob: 0.2})
    texts = make_texts(8)
    stats = run(settings, profile, texts)
    assert sorted(stats.statuses.values()) == sorted([status, "completed"])
    assert stats.attempts == {1: 4, 2: 4}  # half done before the end, half resubmitted
    assert stats.failed == {} and len(store_for(settings, profile)) == 8
    counters = openai_server.counters()
    assert counters["batch_inputs_billed"] == 8  # nothing billed twice
    assert sum(r.tokens for r in batch_ledger(settings)) == counters["batch_tokens_billed"]


def test_without_resubmit_failures_are_reported_and_a_later_run_takes_them_up(setup, openai_server) -> None:
    settings, profile = setup(batch="max_inputs_per_request = 1\n")
    texts = make_texts(6)
    bad = sorted(texts)[:2]
    openai_server.configure(batch_fail_rate=0.0, batch_faulty_batches=1)
    # custom_ids are "b0001-r00000".. in plan order: fail the lines of the first two texts.
    batches, _ = plan_batches(profile, texts, 1)
    fail_ids = tuple(r.custom_id for r in batches[0].requests if batches[0].hashes[r.rows[0]] in bad)
    openai_server.configure(batch_fail_ids=fail_ids)
    stats = run(settings, profile, texts, resubmit=False)
    assert sorted(stats.failed) == bad and stats.stored == 4
    assert all("HTTP 500" in r and "resubmit is off" in r for r in stats.failed.values())
    assert openai_server.counters()["batches_created"] == 1
    progress = read_progress(settings.data_dir / "batch.json")
    assert (progress.unsent, progress.failed, progress.pending, progress.finished) == (2, 0, 2, True)
    again = run(settings, profile, texts)
    assert again.failed == {} and again.stored == 2 and again.resubmitted == 2
    progress = read_progress(settings.data_dir / "batch.json")
    assert (progress.unsent, progress.pending, progress.stored) == (0, 0, 6)


@pytest.mark.parametrize("damage", [lambda s: s.pop("model"), lambda s: s.update(batches=[{"key": 1}]),
                                    lambda s: s.update(failed=[1, 2])])
def test_a_malformed_state_file_is_a_batch_error_naming_it(setup, damage) -> None:
    settings, profile = setup()
    run(settings, profile, make_texts(2))
    path = settings.data_dir / "batch.json"
    state = json.loads(path.read_text())
    damage(state)
    path.write_text(json.dumps(state))
    for call in (lambda: read_progress(path), lambda: run(settings, profile, make_texts(2))):
        with pytest.raises(BatchError, match=r"batch state .*batch\.json is malformed.*move it away"):
            call()


def test_texts_that_keep_failing_stop_at_the_attempt_limit(setup, openai_server) -> None:
    settings, profile = setup(batch="max_attempts = 2\n")
    openai_server.configure(batch_fail_rate=1.0)
    texts = make_texts(3)
    stats = run(settings, profile, texts)
    assert sorted(stats.failed) == sorted(texts) and stats.stored == 0
    assert all("after 2 submissions" in r and "HTTP 500" in r for r in stats.failed.values())
    counters = openai_server.counters()
    assert counters["batches_created"] == 2 and counters["batch_tokens_billed"] == 0
    assert batch_ledger(settings) == []
    # Running again (the user re-runs the command) gives each text a fresh max_attempts.
    openai_server.configure(batch_fail_rate=0.0)
    again = run(settings, profile, texts)
    assert again.batches == 1 and again.stored == 3 and again.failed == {}


def test_a_batch_failed_whole_waits_for_the_others_and_a_rerun_gets_fresh_attempts(
    setup, openai_server
) -> None:
    # Batches of 3 and 1 texts; the provider fails the 3-text one whole at once (as
    # OpenAI's token_limit_exceeded does), while the 1-text one runs for a while.
    settings, profile = setup(batch="max_inputs_per_batch = 3\nmax_attempts = 2\n")
    openai_server.configure(batch_max_inputs=2, batch_delay_s=0.3)
    texts = make_texts(4)
    seen: list[tuple[int, int]] = []

    def sleep(seconds: float) -> None:
        c = openai_server.counters()
        seen.append((c["batches_created"], c["batch_lines_completed"]))
        if c["batch_lines_completed"]:  # the other batch is done: the limit has room again
            openai_server.configure(batch_max_inputs=50_000, batch_delay_s=0.0)
        time.sleep(seconds)

    stats = run(settings, profile, texts, sleep=sleep)
    # Not resubmitted while the other batch ran: no attempt burnt, then stored.
    assert all(created == 2 for created, done in seen if not done)
    assert stats.failed == {} and stats.stored == 4 and stats.batches == 3
    assert sorted(stats.statuses.values()) == ["completed", "completed", "failed"]
    # A run that did use up its attempts on whole failures is tried again by the next run.
    settings, profile = setup(batch="max_attempts = 2\n")
    openai_server.configure(batch_max_inputs=2, batch_delay_s=0.0)
    path = settings.data_dir / "other.json"
    more = make_texts(7)
    stats = embed_with_batches(profile, more, store_for(settings, profile), path)
    assert len(stats.failed) == 3 and all("too_many_inputs" in r for r in stats.failed.values())
    progress = read_progress(path)
    assert progress.failed == 0 and progress.exhausted == 3
    openai_server.configure(batch_max_inputs=50_000)
    stats = embed_with_batches(profile, more, store_for(settings, profile), path)
    assert stats.failed == {} and stats.stored == 3 and stats.batches == 1


def test_a_batch_the_provider_fails_on_validation_reports_its_errors(setup, openai_server) -> None:
    settings, profile = setup(batch="max_attempts = 1\n")
    openai_server.configure(batch_max_inputs=2)  # the provider's limit is lower than the profile's
    stats = run(settings, profile, make_texts(3))
    assert len(stats.failed) == 3 and list(stats.statuses.values()) == ["failed"]
    assert all("too_many_inputs" in r for r in stats.failed.values())


def test_the_state_file_holds_no_text_and_no_key_and_another_space_is_refused(setup) -> None:
    settings, profile = setup()
    texts = make_texts(4)
    run(settings, profile, texts)
    raw = (settings.data_dir / "batch.json").read_text()
    assert LOOPBACK_KEY not in raw and not any(t in raw for t in texts.values())
    other = profile.model_copy(update={"dims": 128})
    with pytest.raises(BatchError, match="belongs to profile 'hosted'"):
        embed_with_batches(other, texts, VectorStore(settings.data_dir, fingerprint(other), 128),
                           settings.data_dir / "batch.json")


def test_sovereign_mode_refuses_before_any_request(setup, openai_server) -> None:
    settings, profile = setup()
    with pytest.raises(SovereigntyError):
        run(settings, profile, make_texts(2), sovereign=True)
    assert openai_server.counters()["requests"] == 0


class _Stop(Exception):
    pass


def _interrupt(_delay: float) -> None:
    raise _Stop  # the process dies at its first wait: the batch is submitted, not finished


def test_a_run_stopped_while_waiting_resumes_the_same_batch(setup, openai_server) -> None:
    settings, profile = setup()
    openai_server.configure(batch_delay_s=0.3)
    texts = make_texts(5)
    with pytest.raises(_Stop):
        run(settings, profile, texts, sleep=_interrupt)
    progress = read_progress(settings.data_dir / "batch.json")
    assert progress is not None and not progress.finished
    assert (progress.texts, progress.in_flight, progress.stored) == (5, 5, 0)
    assert sum(progress.batches.values()) == 1 and "done" not in progress.batches
    stats = run(settings, profile, texts)
    assert (stats.resumed, stats.batches, stats.stored) == (1, 0, 5)
    assert openai_server.counters()["batches_created"] == 1
    done = read_progress(settings.data_dir / "batch.json")
    assert done.finished and (done.stored, done.batches) == (5, {"done": 1})


def test_a_file_uploaded_before_a_kill_is_matched_to_its_batch_not_submitted_again(
    setup, openai_server
) -> None:
    settings, profile = setup()
    openai_server.configure(batch_delay_s=0.3)
    texts = make_texts(4)
    with pytest.raises(_Stop):
        run(settings, profile, texts, sleep=_interrupt)
    # As if the kill came between creating the batch and writing its id down.
    path = settings.data_dir / "batch.json"
    state = json.loads(path.read_text())
    state["batches"][0].update(status="uploaded", batch_id=None)
    path.write_text(json.dumps(state))
    stats = run(settings, profile, texts)
    assert stats.stored == 4 and stats.batches == 0
    assert openai_server.counters()["batches_created"] == 1


def test_a_batch_planned_but_never_uploaded_is_discarded_and_its_passed_texts_planned_anew(
    setup, openai_server
) -> None:
    settings, profile = setup()
    texts = make_texts(4)
    # As if a run was killed after planning its one batch, before the upload.
    path = settings.data_dir / "batch.json"
    planned, _ = plan_batches(profile, texts, 1)
    BatchState(path, profile.name, fingerprint(profile), profile.model, planned, run=1).save()
    passed = dict(list(texts.items())[:3])  # the caller no longer passes one of them
    stats = run(settings, profile, passed)
    assert stats.failed == {} and stats.stored == 3 and stats.batches == 1
    assert stats.attempts == {1: 3} and stats.resubmitted == 0  # the discarded one cost nothing
    assert openai_server.counters()["batch_inputs_billed"] == 3
    progress = read_progress(path)
    assert (progress.texts, progress.stored, progress.failed, progress.in_flight) == (3, 3, 0, 0)
    assert progress.batches == {"done": 1}


def test_should_stop_is_asked_between_uploads_and_creations_and_the_same_command_resumes(
    setup, openai_server
) -> None:
    settings, profile = setup(batch="max_inputs_per_batch = 2\n")
    texts = make_texts(6)  # three batches
    asked: list[int] = []

    def should_stop() -> bool:
        asked.append(openai_server.counters()["files_uploaded"])
        return len(asked) > 3  # upload 1, create 1, upload 2, then stop before creating 2

    with pytest.raises(BatchError, match="the same command resumes"):
        run(settings, profile, texts, should_stop=should_stop)
    counters = openai_server.counters()
    assert (counters["files_uploaded"], counters["batches_created"]) == (2, 1)
    state = json.loads((settings.data_dir / "batch.json").read_text())
    assert [b["status"] for b in state["batches"]][1:] == ["uploaded", "planned"]
    stats = run(settings, profile, texts)
    assert stats.stored == 6 and stats.failed == {}
    counters = openai_server.counters()
    assert (counters["files_uploaded"], counters["batches_created"], counters["batch_inputs_billed"]) == (3, 3, 6)


def test_a_resumed_batch_of_texts_not_passed_is_stored_but_not_reported(setup, openai_server) -> None:
    settings, profile = setup()
    openai_server.configure(batch_delay_s=0.3)
    earlier, now = make_texts(4), dict(list(make_texts(6).items())[4:])
    with pytest.raises(_Stop):
        run(settings, profile, earlier, sleep=_interrupt)
    seen: list[str] = []
    stats = run(settings, profile, now, on_stored=seen.extend)
    assert stats.resumed == 1 and stats.stored == 2 and sorted(seen) == sorted(now)
    assert len(store_for(settings, profile)) == 6  # the earlier batch's vectors were paid for: kept


class _FailingLedger(UsageLedger):
    fail = True

    def record(self, *args, **kw):
        if _FailingLedger.fail:
            _FailingLedger.fail = False
            raise _Stop  # killed between saving the batch done and writing its ledger line
        return super().record(*args, **kw)


def test_a_kill_before_the_ledger_line_is_billed_on_resume_exactly_once(setup, openai_server) -> None:
    settings, profile = setup()
    texts = make_texts(3)
    _FailingLedger.fail = True
    with pytest.raises(_Stop):
        embed_with_batches(profile, texts, store_for(settings, profile), settings.data_dir / "batch.json",
                           _FailingLedger(settings.data_dir))
    assert batch_ledger(settings) == []
    stats = run(settings, profile, texts)
    assert stats.batches == 0 and stats.stored == 0 and stats.skipped == 3
    billed = openai_server.counters()["batch_tokens_billed"]
    assert sum(r.tokens for r in batch_ledger(settings)) == billed > 0 and len(batch_ledger(settings)) == 1
    run(settings, profile, texts)
    assert len(batch_ledger(settings)) == 1  # never twice


_CHILD = """
import sys
from pathlib import Path
from embedpipe.batch import embed_with_batches
from embedpipe.config import load_settings
from embedpipe.profiles import fingerprint
from embedpipe.usage import UsageLedger
from embedpipe.vectors import VectorStore
import json
settings = load_settings(Path(sys.argv[1]))
profile = settings.profile("hosted")
texts = json.loads(Path(sys.argv[2]).read_text())
store = VectorStore(settings.data_dir, fingerprint(profile), profile.dims, profile.name)
embed_with_batches(profile, texts, store, settings.data_dir / "batch.json", UsageLedger(settings.data_dir))
"""


def test_kill_9_while_polling_then_rerun_submits_nothing_new(setup, openai_server, tmp_path) -> None:
    settings, profile = setup(batch="max_inputs_per_batch = 4\n")
    openai_server.configure(batch_delay_s=3600.0)  # held in progress until the test says
    texts = make_texts(10)
    texts_file = tmp_path / "texts.json"
    texts_file.write_text(json.dumps(texts))
    state = settings.data_dir / "batch.json"
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path / "embedpipe.toml"), str(texts_file)],
                             stderr=subprocess.PIPE, env=os.environ.copy())
    kill_9_once_batches_are_submitted(child, state)
    before = openai_server.counters()
    assert before["batches_created"] == before["files_uploaded"] == 3
    assert before["batch_lines_completed"] == 0 and len(store_for(settings, profile)) == 0
    openai_server.configure(batch_delay_s=0.0)  # now the batches finish
    stats = run(settings, profile, texts)
    after = openai_server.counters()
    assert (stats.resumed, stats.batches, stats.files, stats.stored) == (3, 0, 0, 10)
    assert (after["batches_created"], after["files_uploaded"]) == (3, 3)
    assert after["batch_inputs_billed"] == 10  # each text billed once
    assert len(store_for(settings, profile)) == 10
    assert sum(r.tokens for r in batch_ledger(settings)) == after["batch_tokens_billed"]


def test_polling_backs_off_from_poll_initial_s_doubling_to_poll_max_s(setup, openai_server) -> None:
    settings, profile = setup()
    openai_server.configure(batch_delay_s=0.3)
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        time.sleep(seconds)

    stats = run(settings, profile, make_texts(2), sleep=sleep)
    assert stats.stored == 2 and len(waits) >= 5
    assert waits == [min(0.01 * 2 ** n, 0.05) for n in range(len(waits))]
    assert stats.polls == len(waits) + 1  # one look after each wait, and one before the first


def test_the_key_never_reaches_the_logs(setup, openai_server, caplog) -> None:
    settings, profile = setup()
    openai_server.configure(batch_fail_rate=0.5, batch_faulty_batches=1)
    with caplog.at_level("DEBUG"):
        run(settings, profile, make_texts(4))
    assert caplog.records and LOOPBACK_KEY not in caplog.text


def test_transient_errors_of_the_files_and_batches_endpoints_are_retried_without_duplicates(
    setup, openai_server
) -> None:
    settings, profile = setup(batch="max_inputs_per_batch = 3\n", limits="max_retries = 20\n")
    openai_server.configure(batch_api_faults=True, rate_429=0.2, rate_500=0.2, seed=3)
    texts = make_texts(9)
    stats = run(settings, profile, texts)
    counters = openai_server.counters()
    assert counters["faults"].get("429", 0) > 0 and counters["faults"].get("500", 0) > 0
    assert stats.failed == {} and len(store_for(settings, profile)) == 9
    assert counters["batches_created"] == counters["files_uploaded"] == stats.batches == 3
    assert counters["batch_inputs_billed"] == 9


def test_a_batch_whose_creation_reply_was_lost_is_adopted_not_created_twice(setup, openai_server) -> None:
    settings, profile = setup(limits="timeout_s = 0.3\n")
    openai_server.configure(batch_lost_replies=1, timeout_delay_s=0.6)
    stats = run(settings, profile, make_texts(3))
    counters = openai_server.counters()
    assert counters["by_status"].get("timeout") == 1  # the reply really was lost
    assert counters["batches_created"] == 1 and stats.batches == 1
    assert stats.stored == 3 and counters["batch_inputs_billed"] == 3
