"""The feedback loop on the real broker + Redis: the joiner (any order, duplicates, click before
impression, across a kill -9 and restart), the Lua store against the in-memory reference, and the
online trainer publishing a version that a running CopyEngine picks up."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import orjson
import pytest
import redis
import torch
from confluent_kafka import Message, Producer

from core.contracts import Event, FeedbackRecord, GeneratedCopy, ModelVersion
from core.settings import FeedbackSettings, Settings
from core.styles import STYLES
from core.wire import Topics
from engine.serving import CopyEngine
from models.generate import score_ctr, style_distribution
from models.student import load_student
from models.training.online import OnlineTrainer
from services.workers.feedback import build_feedback_loop
from services.workers.trainer import build_trainer_loop, trainer_of
from stream.feedback.logic import InMemoryFeedbackStore, Item, copy_item, event_item
from stream.feedback.store import RedisFeedbackStore
from stream.kafka_io import producer_config
from stream.model_updates import ModelUpdateFollower
from tests.copygen import save_tiny_student
from tests.feedback_data import click_event, copy_record, feedback_records, impression_event, probe_prompts, style_ctr
from tests.integration.helpers import ROOT, ThreadWorker, read_topic, settings_env, wait_until
from tests.integration.test_copy_api import with_generation

pytestmark = pytest.mark.integration


def produce_raw(settings: Settings, records: list[tuple[str, bytes, bytes]]) -> None:
    p = Producer(producer_config(settings.kafka))
    for topic, key, value in records:
        p.produce(topic, key=key, value=value)
    assert p.flush(30) == 0


def feedback_on_topic(settings: Settings, expect: int) -> list[FeedbackRecord]:
    msgs = read_topic(settings, Topics.from_settings(settings.topics).feedback, expect, timeout=60)
    return [FeedbackRecord.model_validate_json(m.value() or b"") for m in msgs]


def test_joiner_any_order_duplicates_and_restart_after_kill(settings: Settings, tmp_path: Path) -> None:
    topics = Topics.from_settings(settings.topics)
    rng = random.Random(3)
    now = int(time.time() * 1000)
    truth: dict[str, bool] = {}
    a: list[tuple[str, bytes, bytes]] = []  # before the kill
    b: list[tuple[str, bytes, bytes]] = []  # after the restart
    for n in range(40):
        imp, cp, user = f"imp-{n}", f"cp-{n // 2}", f"u{n % 7}"
        kind = n % 4  # 0: clicked, all in A; 1: clicked, click in A, impression in B; 2: not clicked, in B;
        #               3: click too late for the window in A, impression in B
        ev_imp = impression_event(imp, cp, ts=now, user=user, product=f"p{n}")
        recs = {"imp": (topics.events, user.encode(), orjson.dumps(ev_imp))}
        if n % 2 == 0:
            recs["copy"] = (topics.copy, user.encode(), copy_record(cp, user=user, product=f"p{n}"))
        if kind in (0, 1):
            recs["click"] = (topics.events, user.encode(), orjson.dumps(click_event(imp, cp, ts=now + 900, user=user,
                                                                                    product=f"p{n}")))
        elif kind == 3:
            recs["click"] = (topics.events, user.encode(), orjson.dumps(click_event(imp, cp, ts=now + 600_000,
                                                                                    user=user, product=f"p{n}")))
        truth[imp] = kind in (0, 1)
        copy_rec = recs.pop("copy", None)
        if copy_rec is not None:
            a.append(copy_rec)
            b.append(copy_rec)  # a re-delivered copy record
        if kind == 0:
            a += [*recs.values(), recs["imp"]]  # with a duplicate impression
        elif kind == 1:
            a.append(recs["click"])
            b += [recs["imp"], recs["click"]]
        elif kind == 2:
            b.append(recs["imp"])
        else:
            a.append(recs["click"])
            b += [recs["imp"], recs["click"]]
    # odd n share the copy record of n - 1 (same copy id): kind 0 impressions have theirs in A
    expect_before_kill = sum(1 for n in range(40) if n % 4 == 0)
    rng.shuffle(a)
    rng.shuffle(b)

    # Phase 1: the CLI joiner; only the clicked impressions of A are due: kill -9 once they are out (the
    # rest of A -- clicks without impressions, copy records -- waits in Redis).
    fb = FeedbackSettings(window_s=2, lateness_s=0.5, copy_wait_s=60, orphan_wait_s=120, sweep_interval_s=0.1)
    s1 = settings.model_copy(update={"feedback": fb})
    produce_raw(s1, a)
    env = {**settings_env(s1), "LIVECOPY_FEEDBACK__WINDOW_S": "2", "LIVECOPY_FEEDBACK__LATENESS_S": "0.5",
           "LIVECOPY_FEEDBACK__SWEEP_INTERVAL_S": "0.1"}
    with open(tmp_path / "joiner.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "livecopy", "worker", "feedback"], env=env, cwd=ROOT,
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: len(read_topic(s1, topics.feedback, expect_before_kill, timeout=2)) >= expect_before_kill,
                   90, "clicked impressions emitted by the first joiner", every=0.5)
        time.sleep(1.0)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    first = feedback_on_topic(s1, expect_before_kill)
    assert len(first) == expect_before_kill and all(r.clicked for r in first), (tmp_path / "joiner.log").read_text()

    # Phase 2: a fresh joiner on the same Redis state gets the rest. It reads
    # the topics from the start under a new group name -- everything phase 1 saw is re-delivered (as
    # after a crash before any commit), and the tansu group would hold the killed member's partitions
    # for about a minute.
    produce_raw(s1, b)
    s2 = s1
    loop = build_feedback_loop(s2, group_suffix="-restarted")
    with ThreadWorker(loop):
        wait_until(lambda: loop.feedback.emitted + len(first) >= len(truth), 90, "every impression emitted")
        time.sleep(1.5)  # anything extra would show up now
    got = feedback_on_topic(s2, len(truth))
    ids = [r.impression_id for r in got]
    assert sorted(ids) == sorted(truth), "exactly one record per impression"
    assert {r.impression_id: r.clicked for r in got} == truth
    assert all((r.click_ts is not None) == r.clicked and r.model_version == "v1" and r.features for r in got)
    stats = RedisFeedbackStore(redis.Redis.from_url(s2.redis.url), s2.feedback, s2.redis.key_prefix).stats()
    assert stats.by["all"]["all"] == (len(truth), sum(truth.values()))
    assert stats.by["mv"]["livecopy-student@v1"] == (len(truth), sum(truth.values()))
    assert read_topic(s2, topics.dlq, 0, timeout=1) == []


def test_joiner_dead_letters_a_feedback_record_too_large_to_produce_and_goes_on(settings: Settings) -> None:
    """A ~1 MB copy record (within the broker's limit) makes a feedback record over the producer's
    message.max.bytes: that impression goes to the DLQ, the others are emitted, the joiner lives on."""
    topics = Topics.from_settings(settings.topics)
    fb = FeedbackSettings(window_s=1, lateness_s=0.2, reclaim_s=1, sweep_interval_s=0.1)
    s = settings.model_copy(update={"feedback": fb})
    now = int(time.time() * 1000)
    big = orjson.loads(copy_record("cp-big"))
    big["features"]["pad"] = "x" * 1_010_000
    big_value = orjson.dumps(big)
    assert 1_000_000 < len(big_value) < 1_048_000  # over the producer default, under the broker's limit
    p = Producer(producer_config(s.kafka, **{"message.max.bytes": 1_048_588}))
    p.produce(topics.copy, key=b"u1", value=big_value)
    assert p.flush(30) == 0
    evs = [impression_event("i-big", "cp-big", ts=now), click_event("i-big", "cp-big", ts=now + 5),
           impression_event("i-ok", "cp-ok", ts=now), click_event("i-ok", "cp-ok", ts=now + 5),
           impression_event("i-late", "cp-ok", ts=now)]
    produce_raw(s, [(topics.copy, b"u1", copy_record("cp-ok"))]
                + [(topics.events, b"u1", orjson.dumps(e)) for e in evs])
    loop = build_feedback_loop(s)
    with ThreadWorker(loop) as w:
        wait_until(lambda: loop.feedback.emitted == 2, 60, "the producible impressions emitted")
        time.sleep(3 * fb.reclaim_s)  # the dead-lettered one is done: never claimed again
        assert w.thread.is_alive()
    got = feedback_on_topic(s, 2)
    assert sorted((r.impression_id, r.clicked) for r in got) == [("i-late", False), ("i-ok", True)]
    dlq = read_topic(s, topics.dlq, 1, timeout=10)
    assert len(dlq) == 1 and loop.feedback.unproducible == 1
    h = dict(dlq[0].headers() or [])
    assert h["error"] == b"feedback_unproducible" and b"MSG_SIZE_TOO_LARGE" in h["error.detail"]
    assert h["source.topic"] == topics.events.encode()
    stats = RedisFeedbackStore(redis.Redis.from_url(s.redis.url), s.feedback, s.redis.key_prefix).stats()
    assert stats.by["all"]["all"] == (2, 1) and stats.by["dlq"]["feedback_unproducible"] == (1, 1)


def test_orphans_land_in_the_dlq_as_the_original_records(settings: Settings) -> None:
    """An impression whose copy record never comes and a click whose impression never comes go to the
    DLQ as they were read: key (or none) and bytes unchanged, with the reason and their source.*."""
    topics = Topics.from_settings(settings.topics)
    fb = FeedbackSettings(window_s=0.5, lateness_s=0.1, copy_wait_s=1, orphan_wait_s=1.5, reclaim_s=1,
                          sweep_interval_s=0.1)
    s = settings.model_copy(update={"feedback": fb})
    ts = datetime.fromtimestamp(time.time(), tz=timezone(timedelta(hours=-5))).isoformat(timespec="milliseconds")
    long_id = "imp-" + "z" * 124  # 128 chars, as the contract allows
    imp = (f'{{"type":"impression", "event_id":"e-imp-1", "user_id":"u1", "ts":"{ts}", "product_id":"p1",\n'
           f' "category":"home/kitchen", "price":39.9, "impression_id":"{long_id}", "copy_id":"cp-never",\n'
           f' "props":{{"ab":"b"}}, "unknown_field":true}}').encode()
    click = (f'{{ "event_id": "e-click-1", "type": "click", "user_id": "u2", "ts": "{ts}", "product_id": "p2",'
             f' "impression_id": "imp-never", "copy_id": "cp-2", "slot": "pdp", "price": 5 }}').encode()
    where: dict[bytes, tuple[int, int]] = {}

    def delivered(err: object, msg: Message) -> None:
        assert err is None
        where[msg.value() or b""] = (msg.partition() or 0, msg.offset() or 0)

    p = Producer(producer_config(s.kafka))
    p.produce(topics.events, value=imp, on_delivery=delivered)  # no key
    p.produce(topics.events, key=b"u2", value=click, on_delivery=delivered)
    assert p.flush(30) == 0 and len(where) == 2
    loop = build_feedback_loop(s)
    with ThreadWorker(loop):
        wait_until(lambda: loop.feedback.orphans == 2, 60, "both orphans sent to the DLQ")
    dlq = {dict(m.headers() or [])["error"]: m for m in read_topic(s, topics.dlq, 2, timeout=10)}
    assert set(dlq) == {b"copy_not_found", b"impression_not_found"}
    for reason, key, value in ((b"copy_not_found", None, imp), (b"impression_not_found", b"u2", click)):
        m = dlq[reason]
        assert m.key() == key and m.value() == value, reason
        h = dict(m.headers() or [])
        part, off = where[value]
        assert (h["source.topic"], h["source.partition"], h["source.offset"]) == (
            topics.events.encode(), str(part).encode(), str(off).encode())
        assert h["error.detail"] and b"\n" not in h["error.detail"]
    assert len(read_topic(s, topics.dlq, 2, timeout=1)) == 2  # once each
    client = redis.Redis.from_url(s.redis.url)
    assert list(client.scan_iter(s.redis.key_prefix + "fb:*:r:*")) == []  # done: the records let go


def test_every_key_a_claim_writes_has_a_ttl(settings: Settings) -> None:
    """An impression whose copy record came and then expired waits for it again: the claim puts it back
    into the copy's waiting set, which must expire like every other key of the joiner."""
    cfg = FeedbackSettings(window_s=10, lateness_s=1, copy_wait_s=5, shards=1)
    client = redis.Redis.from_url(settings.redis.url)
    store = RedisFeedbackStore(client, cfg, settings.redis.key_prefix)
    t0 = 1_795_000_000_000
    imp = event_item(Event.model_validate(impression_event("i1", "c1", ts=t0)), "ev|0|1", b"u1", b"{}")
    assert imp is not None
    store.apply([imp], t0)
    store.apply([copy_item(GeneratedCopy.model_validate_json(copy_record("c1")))], t0 + 1)  # wakes i1 up
    p = store.shard_prefix(0)
    assert client.exists(p + "w:c1") == 0
    client.delete(p + "c:c1")  # the copy record expired
    assert store.claim(t0 + 2, "tok") == []  # i1 waits again (for its window, then its copy record)
    assert client.sismember(p + "w:c1", "i1")
    keys = list(client.scan_iter(p + "*"))
    no_ttl = [k for k in keys if client.pttl(k) == -1 and not k.endswith((b":due", b":ctr"))]
    assert no_ttl == []
    assert 0 < client.pttl(p + "w:c1") <= cfg.state_ttl_s * 1000


def test_redis_lua_store_matches_the_in_memory_reference(settings: Settings) -> None:
    cfg = FeedbackSettings(window_s=10, lateness_s=1, copy_wait_s=5, orphan_wait_s=20, reclaim_s=3, shards=4,
                           sweep_limit=7)
    client = redis.Redis.from_url(settings.redis.url)
    red = RedisFeedbackStore(client, cfg, settings.redis.key_prefix)
    mem = InMemoryFeedbackStore(cfg)
    rng = random.Random(11)
    t0 = 1_795_000_000_000
    offsets = iter(range(10**6))

    def item(ev: dict[str, object]) -> Item:
        # the record as read: keyed or not, bytes the joiner keeps for the DLQ (binary-safe: not UTF-8 here)
        raw = orjson.dumps(ev) + (b" \xff\x00" if rng.random() < 0.3 else b"")
        key = str(ev["user_id"]).encode() if rng.random() < 0.7 else None
        it = event_item(Event.model_validate(ev), f"ev|0|{next(offsets)}", key, raw)
        assert it is not None
        return it

    items: list[Item] = []
    for n in range(150):
        imp, cp = f"i{n}", f"c{n % 60}"
        ts = t0 + rng.randint(0, 20_000)
        if rng.random() < 0.95:
            items.append(item(impression_event(imp, cp, ts=ts)))
        if rng.random() < 0.4:
            items.append(item(click_event(imp, cp, ts=ts + rng.randint(-1000, 15_000))))
    for c in range(55):  # five copy records never come
        items.append(copy_item(GeneratedCopy.model_validate_json(copy_record(f"c{c}"))))
    items += rng.sample(items, 40)
    rng.shuffle(items)
    now = t0
    Entry = tuple[str, str, bool, str, str, bytes | None, bytes | None]
    log_r: list[Entry] = []
    log_m: list[Entry] = []
    for i in range(0, len(items), 13):
        chunk = items[i:i + 13]
        ra, ma = red.apply(chunk, now), mem.apply(chunk, now)
        assert ra == ma, [(it, x, y) for it, x, y in zip(chunk, ra, ma, strict=True) if x != y]
        now += rng.randint(0, 1500)
        for store, log in ((red, log_r), (mem, log_m)):
            claimed = store.claim(now, f"tok{i}")
            log += sorted((c.state.impression_id, c.decision.kind, c.decision.clicked, c.decision.reason,
                           c.state.source, c.state.raw_key, c.state.raw_value) for c in claimed)
            if i % 3:  # ack only some: the others are claimed again after reclaim_s
                store.ack([(c, ["all|all"]) for c in claimed], now)

    def kept_records() -> set[str]:
        """Impressions whose record is kept in Redis (checking each has the state's TTL)."""
        keys = list(client.scan_iter(settings.redis.key_prefix + "fb:*:r:*"))
        assert all(0 < client.pttl(k) <= cfg.state_ttl_s * 1000 for k in keys)
        return {k.decode().split(":r:", 1)[1] for k in keys}

    # the record is kept while the impression is not done, and let go when it is
    open_ = {i for i, st in mem.states.items() if st.raw_value is not None}
    assert open_ and kept_records() == open_
    assert {i for i, st in mem.states.items() if st.status == "d"} - open_
    for _ in range(40):
        now += 1000
        for store, log in ((red, log_r), (mem, log_m)):
            claimed = store.claim(now, f"end{now}")
            log += sorted((c.state.impression_id, c.decision.kind, c.decision.clicked, c.decision.reason,
                           c.state.source, c.state.raw_key, c.state.raw_value) for c in claimed)
            store.ack([(c, ["all|all"]) for c in claimed], now)
    assert log_r == log_m
    assert red.stats().by == mem.stats().by
    assert {e[1] for e in log_r} == {"emit", "orphan"}
    assert all(e[6] is not None for e in log_r) and {e[5] is None for e in log_r} == {True, False}
    assert kept_records() == {i for i, st in mem.states.items() if st.raw_value is not None} == set()


@pytest.mark.parametrize("mode", ["head", "full"])
def test_trainer_learns_the_clicked_style_and_a_running_generator_picks_the_version_up(
        settings: Settings, tmp_path: Path, mode: str) -> None:
    torch.set_num_threads(1)
    fav = STYLES[2]
    base = save_tiny_student(tmp_path / "base", "0.9.0", seed=1)
    s = with_generation(settings, base, hot_reload=True, registry_dir=tmp_path / "registry")
    s = s.model_copy(update={"trainer": s.trainer.model_copy(update={
        "registry_dir": tmp_path / "registry", "base_dir": base, "mode": mode, "batch_size": 32, "lr": 1e-2,
        "eval_every": 6, "refit_every": 250, "head_min_steps": 200,
        "logloss_tolerance": 0.02 if mode == "head" else 0.0, "gate_z": 1.0 if mode == "head" else 0.0,
        "min_heldout": 20,
        "heldout_fraction": 0.15})})
    topics = Topics.from_settings(s.topics)
    recs = feedback_records(900, style_ctr(fav), seed=1)
    produce_raw(s, [(topics.feedback, r.copy_id.encode(), r.model_dump_json().encode()) for r in recs])
    engine = CopyEngine.from_settings(s).start()
    follower = ModelUpdateFollower(s, engine.model, engine.apply_update).start()  # as in the API / generator
    try:
        assert engine.version == "0.9.0"
        loop = build_trainer_loop(s, trainer=OnlineTrainer(None, s.trainer))
        proc = trainer_of(loop)
        with ThreadWorker(loop):
            wait_until(lambda: loop.records >= len(recs) and bool(proc.announced), 240, "feedback consumed")
            try:
                wait_until(lambda: not proc.unannounced and engine.version == proc.announced[-1].version, 60,
                           "the generator swapped to the newest version")
            except AssertionError as exc:
                raise AssertionError(f"{exc}: {engine.reloads.events}, {proc.announced}") from None
        served = engine.version
    finally:
        follower.stop()
        engine.stop()
    mv = next(m for m in proc.announced if m.version == served)
    assert mv.parent_version is not None and Path(mv.path).is_dir()
    ups = [ModelVersion.model_validate_json(m.value() or b"")
           for m in read_topic(s, topics.model_updates, len(proc.announced), timeout=10)]
    assert [u.version for u in ups] == [m.version for m in proc.announced]

    old, new = load_student(base), load_student(mv.path)
    prompts = probe_prompts(16)
    probe = feedback_records(120, style_ctr(fav), seed=77)
    from models.text.context import build_prompt, context_from_features

    pp = [build_prompt(context_from_features(r.features)) for r in probe]

    def share(m: object) -> float:
        return sum(p[fav] for p in style_distribution(m, old.tokenizer, prompts)) / len(prompts)

    def gap(m: object) -> float:
        sc = score_ctr(m, old.tokenizer, pp, [r.template or r.text for r in probe], [r.style for r in probe])
        f = [x for x, r in zip(sc, probe, strict=True) if r.style == fav]
        o = [x for x, r in zip(sc, probe, strict=True) if r.style != fav]
        return sum(f) / len(f) - sum(o) / len(o)

    if mode == "full":
        assert share(new.model) > share(old.model) + 0.1
    else:  # heads only: the trunk is the base's, and the generator's style policy tilts to the clicked style
        assert all(torch.equal(a, b) for a, b in zip(old.model.transformer.parameters(),
                                                     new.model.transformer.parameters(), strict=True))
        assert engine.executor.style_policy is not None
        bias = engine.executor.style_policy.bias(context_from_features(probe[0].features))
        assert max(bias, key=lambda st: bias[st]) == fav
    # The trained head scores the clicked style higher, on the slotted copy the generator scores and
    # the trainer trains on (the filled text is another token sequence: with corpus v4's phrasings
    # its gap went negative). How much varies from run to run: the trainer's dropout draws from
    # torch's process-wide RNG, which the follower's model loads in another thread also draw from
    # (head +0.037, full +0.008 alone).
    assert gap(new.model) > gap(old.model) + 0.001


def test_models_cli_lists_promotes_and_rolls_back_with_announcements(settings: Settings, tmp_path: Path) -> None:
    from models.registry import Registry

    reg = Registry(tmp_path / "registry", "livecopy-student")
    reg.import_base(save_tiny_student(tmp_path / "base", "0.9.0", seed=1), "0.9.0")
    save_tiny_student(reg.path_of("v2"), "v2", seed=2)
    reg.add("v2", "0.9.0", {"heldout_ctr_logloss": 0.5}, promote=False)
    env = {**settings_env(settings), "LIVECOPY_TRAINER__REGISTRY_DIR": str(tmp_path / "registry")}

    def cli(*args: str) -> str:
        p = subprocess.run([sys.executable, "-m", "livecopy", "models", *args], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stdout + p.stderr
        return p.stdout

    assert "* 0.9.0" in cli("list")
    cli("promote", "v2", "--reason", "test")
    assert reg.current() == "v2"
    cli("rollback")
    assert reg.current() == "0.9.0"
    ups = [ModelVersion.model_validate_json(m.value() or b"")
           for m in read_topic(settings, Topics.from_settings(settings.topics).model_updates, 2, timeout=20)]
    assert [(u.version, u.action) for u in ups] == [("v2", "promote"), ("0.9.0", "rollback")]
    assert Path(ups[0].path) == reg.path_of("v2")
    assert [h["action"] for h in reg.history()] == ["import", "promote", "rollback"]
