"""The JSON Schemas in docs/schemas/: equal to what core.schemas generates now (drift fails here), and the
records the workers really write -- by their own code -- validate against them (jsonschema, draft 2020-12)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest
from click.testing import CliRunner

from core.catalog import Catalog
from core.catalog_io import decode_product
from core.contracts import Embedding, Event, GeneratedCopy
from core.schemas import TOPICS, render, schemas
from core.settings import FeedbackSettings
from core.wire import Record, Rejection, decode_event, dlq_headers, encode, encode_event
from livecopy.cli import cli, register
from models.registry import Registry
from stream.copy_store import encode_copy
from stream.feedback.logic import InMemoryFeedbackStore, copy_item, event_item, feedback_record
from stream.kafka_io import dlq_record
from tests.feedback_data import click_event, copy_record, impression_event

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "schemas"


def validator(topic: str) -> jsonschema.Draft202012Validator:
    t = next(t for t in TOPICS if t.topic == topic)
    schema = json.loads((DOCS / t.file).read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def valid(topic: str, record: Any) -> None:
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator(topic).iter_errors(record)]
    assert not errors, errors


def invalid(topic: str, record: Any) -> None:
    assert not validator(topic).is_valid(record), record


def test_the_committed_schemas_are_the_generated_ones() -> None:
    generated = schemas()
    assert sorted(p.name for p in DOCS.glob("*.json")) == sorted(generated)
    for name, schema in generated.items():
        assert (DOCS / name).read_text() == render(schema), f"{name} is stale: run `livecopy contracts schemas`"
    register(cli)
    res = CliRunner().invoke(cli, ["contracts", "schemas", "--check", "--out", str(DOCS)])
    assert res.exit_code == 0, res.output


def test_the_check_catches_drift(tmp_path: Path) -> None:
    register(cli)
    runner = CliRunner()
    assert runner.invoke(cli, ["contracts", "schemas", "--out", str(tmp_path)]).exit_code == 0
    assert runner.invoke(cli, ["contracts", "schemas", "--check", "--out", str(tmp_path)]).exit_code == 0
    f = tmp_path / "livecopy.feedback.schema.json"
    f.write_text(f.read_text().replace('"clicked"', '"klicked"'))
    res = runner.invoke(cli, ["contracts", "schemas", "--check", "--out", str(tmp_path)])
    assert res.exit_code == 1 and "livecopy.feedback.schema.json" in res.output


def joined_feedback(clicked: bool, embedding: bool) -> dict[str, Any]:
    """A feedback record as the feedback joiner makes it (stream.feedback.logic) and encodes it (core.wire)."""
    cfg = FeedbackSettings()
    store = InMemoryFeedbackStore(cfg)
    t0 = 1_795_000_000_000
    copy = GeneratedCopy.model_validate_json(copy_record("c1", model_version="2.0.0", style="quality"))
    if embedding:
        copy = copy.model_copy(update={"embedding": Embedding.pack([0.25, -1.5, 3.0], trunk="2.0.0")})
    items = [copy_item(copy), event_item(Event.model_validate(impression_event("i1", "c1", ts=t0, slot="pdp")))]
    if clicked:
        items.append(event_item(Event.model_validate(click_event("i1", "c1", ts=t0 + 2000))))
    store.apply([it for it in items if it is not None], t0)
    now = t0 + int((cfg.window_s + cfg.lateness_s) * 1000) + 1
    (claimed,) = store.claim(now, "tok")
    rec = feedback_record(claimed)
    assert rec.clicked is clicked
    out: dict[str, Any] = json.loads(encode(rec))
    return out


@pytest.mark.parametrize(("clicked", "embedding"), [(True, False), (False, True)])
def test_feedback_records_the_joiner_writes_validate(clicked: bool, embedding: bool) -> None:
    rec = joined_feedback(clicked, embedding)
    assert rec["propensity"] == 0.5 and rec["style"] == "quality" and rec["slot"] == "pdp"
    valid("livecopy.feedback", rec)
    invalid("livecopy.feedback", {k: v for k, v in rec.items() if k != "clicked"})
    invalid("livecopy.feedback", {**rec, "propensity": "0.5"})


def test_copy_records_validate() -> None:
    copy = GeneratedCopy.model_validate_json(copy_record("c1"))
    valid("livecopy.copy", orjson.loads(encode_copy(copy)))  # the generator's and the API's encoding
    valid("livecopy.copy", json.loads(encode(copy)))  # every optional field present, null
    invalid("livecopy.copy", {**orjson.loads(encode_copy(copy)), "score": 1.5})


def test_dlq_headers_validate() -> None:
    rec = Record("livecopy.events", 3, 42, b"u1", b"{not json")
    for shrink in (0, 1, 2):
        _, _, headers = dlq_record(rec, Rejection("not_json", "unexpected character"), shrink)
        valid("livecopy.events.dlq", {k: v.decode() for k, v in headers})
    collector = [*dlq_headers(Rejection("unknown_copy", "c9 not served"), "livecopy.events", -1, -1),
                 ("source", b"collector"), ("collector.site", b"shop")]
    valid("livecopy.events.dlq", {k: v.decode() for k, v in collector})
    invalid("livecopy.events.dlq", {"error": "x", "source.topic": "t", "source.partition": "0", "source.offset": "1"})


def test_model_update_records_validate(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    (base / "livecopy.json").write_text("{}")
    mv = Registry(tmp_path / "registry", "livecopy-student").import_base(base, "2.0.0", {"heldout_n": 10})
    valid("livecopy.model-updates", json.loads(mv.model_dump_json()))  # as services.workers.trainer.announce
    invalid("livecopy.model-updates", {"name": "livecopy-student", "version": "2.0.0"})


def test_catalog_records_validate_and_agree_with_the_decoder() -> None:
    for p in Catalog.generate(40, seed=3):
        row = orjson.loads(orjson.dumps(p.to_dict()))  # as `livecopy catalog load` produces it
        valid("livecopy.catalog", row)
        assert decode_product(row) == p
    row = orjson.loads(orjson.dumps(next(iter(Catalog.generate(1, seed=3))).to_dict()))
    minimal = {k: row[k] for k in ("product_id", "title", "category", "price")}
    valid("livecopy.catalog", minimal)
    decode_product(minimal)
    for bad in ({**row, "prize": 3}, {**row, "price": 0}, {**row, "product_id": "has space"},
                {**row, "currency": "usd"}, {**row, "discount_pct": 96}, {**row, "category": "a//b"}):
        invalid("livecopy.catalog", bad)
        with pytest.raises(Rejection):
            decode_product(bad)


def test_events_validate_and_agree_with_the_decoder() -> None:
    imp = impression_event("i1", "c1", ts=1_795_000_000_000, slot="pdp")
    valid("livecopy.events", imp)
    valid("livecopy.events", orjson.loads(encode_event(decode_event(b"u1", orjson.dumps(imp)))))
    view = {"event_id": "e-1", "type": "product_view", "user_id": "u-42", "ts": "2026-11-22T10:00:00Z",
            "product_id": "sku-981", "category": "home/kitchen", "price": 39.9}
    valid("livecopy.events", view)
    decode_event(None, orjson.dumps(view))
    for bad in ({**imp, "copy_id": None}, {k: v for k, v in view.items() if k != "product_id"},
                {**view, "ts": "yesterday"}, {**view, "type": "hover"}, {**view, "user_id": "u 42"}):
        invalid("livecopy.events", bad)
        with pytest.raises(Rejection):
            decode_event(None, orjson.dumps(bad))
