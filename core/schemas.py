"""JSON Schemas (draft 2020-12) of every topic's records, generated from the contract models.

``livecopy contracts schemas --out docs/schemas`` writes one file per topic; a test checks that the
committed files equal what this module generates (drift fails CI) and that the records the workers
really write validate against them. Records a worker writes (copy, feedback, model-updates) are
described as serialized (``mode="serialization"``: every optional field present, possibly null);
records sites write (events, catalog) as the workers accept them (``mode="validation"``). The DLQ
record's value is the original record's bytes, so its schema describes its headers (as an object).
``CatalogProduct`` and ``DlqHeaders`` are the wire forms of records that have no pydantic model in
core.contracts (``core.catalog_io.decode_product`` and ``core.wire.dlq_headers`` are the code).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from core.contracts import (
    _MAX_EPOCH_MS,
    _RFC3339,
    IMPRESSION_REQUIRED,
    PRODUCT_REQUIRED,
    Event,
    FeedbackRecord,
    GeneratedCopy,
    ModelVersion,
)

DIALECT = "https://json-schema.org/draft/2020-12/schema"
ID_BASE = "https://livecopy.dev/schemas/v1/"  # a name, not fetched: the files are in docs/schemas/


class CatalogProduct(BaseModel):
    """`livecopy.catalog` record (key: `product_id`; no value = delete), as `core.catalog_io.decode_product`
    accepts it from the topic. Optional fields may be absent or null; unknown fields are refused."""

    model_config = ConfigDict(extra="forbid")

    product_id: Annotated[str, StringConstraints(pattern=r"^[!-~]{1,128}$")] = Field(
        description="1-128 printable ASCII characters without spaces; equals the record key")
    title: Annotated[str, StringConstraints(max_length=1000, pattern=r"\S")] = Field(
        description="whitespace runs collapse to one space; copy shows at most 70 characters")
    category: Annotated[str, StringConstraints(max_length=200, pattern=r"^[^/]*[^/\s][^/]*(/[^/]*[^/\s][^/]*)*$")] = \
        Field(description="`top` or `top/sub` (lower-cased, spaces around `/` dropped)")
    price: Annotated[float, Field(ge=0.01, le=10_000_000)] = Field(description="in `currency`, rounded to cents")
    currency: Annotated[str, StringConstraints(pattern=r"^[A-Z]{3}$")] | None = Field(
        None, description="ISO 4217 code (default USD)")
    brand: Annotated[str, StringConstraints(max_length=200)] | None = None
    noun: Annotated[str, StringConstraints(max_length=200)] | None = Field(
        None, description='the generic product noun, e.g. "dutch oven"')
    attributes: Annotated[list[Annotated[str, StringConstraints(max_length=80)]], Field(max_length=32)] | None = None
    rating: Annotated[float, Field(ge=0, le=5)] | None = Field(None, description="0: not rated")
    reviews: Annotated[int, Field(ge=0, le=1_000_000_000)] | None = None
    discount_pct: Annotated[int, Field(ge=0, le=95)] | None = None
    eco: bool | None = None


class DlqHeaders(BaseModel):
    """`livecopy.events.dlq` record headers (UTF-8 strings). The record's key and value are the original
    record's, unchanged (or its value's first 64 KiB with `error.truncated`)."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    error: str = Field(description="short reason, e.g. missing_field, copy_not_found, unknown_copy")
    error_detail: str = Field(alias="error.detail", description="one line")
    source_topic: str = Field(alias="source.topic")
    source_partition: Annotated[str, StringConstraints(pattern=r"^-?\d+$")] = Field(
        alias="source.partition", description="decimal; -1: never on a topic (the HTTP collector)")
    source_offset: Annotated[str, StringConstraints(pattern=r"^-?\d+$")] = Field(alias="source.offset")
    error_truncated: Literal["true"] | None = Field(None, alias="error.truncated")
    source_size: Annotated[str, StringConstraints(pattern=r"^\d+$")] | None = Field(None, alias="source.size")
    source_key_size: Annotated[str, StringConstraints(pattern=r"^\d+$")] | None = Field(None, alias="source.key_size")
    source: Literal["collector"] | None = Field(None, description="set by POST /v1/events")
    collector_site: str | None = Field(None, alias="collector.site")


# Notes for outside consumers of the feedback topic (added to the generated schema's properties).
FEEDBACK_NOTES = {
    "impression_id": "unique per impression; delivery is at-least-once: dedupe on it",
    "clicked": "the reward: a click within the attribution window",
    "propensity": "probability the logging policy had of choosing this copy among its candidates (IPS weight "
                  "1/propensity); 1 for greedy and fallback",
    "policy": "the logging policy, e.g. thompson, greedy, epsilon_greedy, random, fallback",
    "style": "the copy's style token (the arm a style-level learner chooses), e.g. quality, discount",
    "features": "the conditioning context the generator used: product, persona buckets, slot, profile_version",
    "score": "the model's predicted CTR of the copy",
    "model_version": "the exact model version that produced the copy",
}


def _event_rules(schema: dict[str, Any]) -> None:
    """What the event model checks in code: ``ts`` in either form, the fields each type requires."""
    schema["properties"]["ts"] = {
        "title": "Ts", "description": "event time: RFC 3339 string or integer epoch milliseconds",
        "anyOf": [{"type": "string", "pattern": _RFC3339.pattern},
                  {"type": "integer", "minimum": 0, "maximum": _MAX_EPOCH_MS}]}

    def when(types: frozenset[Any], fields: list[str]) -> dict[str, Any]:
        return {"if": {"properties": {"type": {"enum": sorted(str(t) for t in types)}}, "required": ["type"]},
                "then": {"required": fields, "properties": {f: {"type": "string"} for f in fields}}}

    schema["allOf"] = [when(PRODUCT_REQUIRED, ["product_id"]), when(frozenset({"search"}), ["query"]),
                       when(IMPRESSION_REQUIRED, ["impression_id", "copy_id"])]


@dataclass(frozen=True)
class TopicSchema:
    file: str
    topic: str
    model: type[BaseModel]
    mode: Literal["validation", "serialization"]
    what: str
    notes: dict[str, str] | None = None
    patch: Callable[[dict[str, Any]], None] | None = None  # rules the model checks in code
    own_doc: bool = False  # the model's docstring describes the record (this module's models)


TOPICS = (
    TopicSchema("livecopy.events.schema.json", "livecopy.events", Event, "validation",
                "one event (key: user_id); unknown top-level fields are ignored", patch=_event_rules),
    TopicSchema("livecopy.events.dlq.headers.schema.json", "livecopy.events.dlq", DlqHeaders, "validation",
                "the headers of a DLQ record (its key and value are the original record's)", own_doc=True),
    TopicSchema("livecopy.copy.schema.json", "livecopy.copy", GeneratedCopy, "serialization",
                "one generated copy (key: user_id); also the body of GET /v1/copy"),
    TopicSchema("livecopy.feedback.schema.json", "livecopy.feedback", FeedbackRecord, "serialization",
                "one labelled impression (key: copy_id)", FEEDBACK_NOTES),
    TopicSchema("livecopy.model-updates.schema.json", "livecopy.model-updates", ModelVersion, "serialization",
                "one model version to serve (key: model name; compacted)"),
    TopicSchema("livecopy.catalog.schema.json", "livecopy.catalog", CatalogProduct, "validation",
                "one product (key: product_id; compacted, no value = delete)", own_doc=True),
)


def schema_of(t: TopicSchema) -> dict[str, Any]:
    """The JSON Schema of one topic's records."""
    body = t.model.model_json_schema(mode=t.mode, by_alias=True)
    doc = " ".join(str(body.pop("description", "")).split()) if t.own_doc else ""
    body.pop("description", None)
    if t.patch is not None:
        t.patch(body)
    for name, note in (t.notes or {}).items():
        prop = body["properties"][name]
        prop["description"] = f"{prop['description']} ({note})" if "description" in prop else note
    head = {"$schema": DIALECT, "$id": ID_BASE + t.file, "title": f"{t.topic} record",
            "description": f"`{t.topic}`: {t.what}. Generated from the contract models (core.contracts, "
                           f"core.schemas) by `livecopy contracts schemas`; see docs/CONTRACTS.md. {doc}".strip()}
    body.pop("title", None)
    return {**head, **body}


def schemas() -> dict[str, dict[str, Any]]:
    """file name -> schema, for every topic."""
    return {t.file: schema_of(t) for t in TOPICS}


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def write(out: Path) -> list[Path]:
    """Write every schema under ``out``; returns the files."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, schema in schemas().items():
        p = out / name
        p.write_text(render(schema), encoding="utf-8")
        paths.append(p)
    return paths


def stale(out: Path) -> list[str]:
    """The files under ``out`` that differ from (or lack) what would be generated now."""
    return [name for name, schema in schemas().items()
            if not (out / name).exists() or (out / name).read_text(encoding="utf-8") != render(schema)]
