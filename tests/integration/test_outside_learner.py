"""examples/outside_learner.py against the real broker: it consumes a few hundred feedback records from
the feedback topic (uniformly random logging, one style clicked far more) and prints its off-policy
estimate beside livecopy's logged CTR."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from confluent_kafka import Producer

from core.settings import Settings
from core.wire import Topics, encode
from stream.kafka_io import producer_config
from tests.feedback_data import feedback_records, style_ctr
from tests.integration.helpers import ROOT

pytestmark = pytest.mark.integration


def test_the_outside_learner_prints_its_estimate_beside_livecopys(settings: Settings) -> None:
    pytest.importorskip("river", reason="the example's learner: pip install -e '.[examples]' (scripts/setup.sh does)")
    topic = Topics.from_settings(settings.topics).feedback
    records = feedback_records(600, style_ctr("quality"), seed=5)
    producer = Producer(producer_config(settings.kafka))
    for rec in records:
        producer.produce(topic, key=rec.copy_id.encode(), value=encode(rec))
    producer.produce(topic, key=records[0].copy_id.encode(), value=encode(records[0]))  # a re-delivery
    assert producer.flush(30) == 0

    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "outside_learner.py"), "--bootstrap",
         settings.kafka.bootstrap_servers, "--topic", topic, "--from-beginning", "--idle-timeout", "5",
         "--schema", str(ROOT / "docs" / "schemas" / "livecopy.feedback.schema.json"), "--json"],
        capture_output=True, text=True, timeout=180, cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    print(out.stdout)
    assert "livecopy's policy, logged CTR" in out.stdout and "outside learner" in out.stdout
    assert "SNIPS" in out.stdout and "IPS" in out.stdout
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["records"] == 600 and figures["skipped"] == {"duplicate": 1, "no_style_or_propensity": 0,
                                                                 "invalid": 0}
    logged = sum(r.clicked for r in records) / len(records)
    assert figures["livecopy_logged_ctr"] == pytest.approx(logged)
    # the learner finds the favoured style: its policy's estimated CTR is well above uniform logging's
    assert figures["learner_snips"] > 1.5 * logged, figures
    assert figures["learner_ess"] > 50 and figures["logging_policies"] == {"random": 600}
