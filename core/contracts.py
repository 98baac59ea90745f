"""Pydantic v2 models of every record in ../shared/CONTRACTS.md (v1).

Validation is strict: JSON numbers must be numbers, strings strings; an event that breaks the
table is rejected with a short reason code (see `core.wire.RejectReason`). Unknown top-level
fields are ignored for forward compatibility. Event time is normalised to integer epoch
milliseconds (`Event.ts`), whichever of the two allowed forms arrived.
"""

from __future__ import annotations

import base64
import re
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    StringConstraints,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

MAX_EVENT_BYTES = 64 * 1024
MAX_PROPS_BYTES = 4 * 1024
MAX_COPY_CHARS = 280

ID_PATTERN = r"^[A-Za-z0-9_.:\-]{1,128}$"
USER_PATTERN = r"^[A-Za-z0-9_.:@\-]{1,128}$"

Id = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
UserId = Annotated[str, StringConstraints(pattern=USER_PATTERN)]
_ID_RE = re.compile(ID_PATTERN)
_USER_RE = re.compile(USER_PATTERN)


def is_id(value: str) -> bool:
    """True for a valid event/product/copy id (the whole string: Python's ``$`` also matches before a final newline)."""
    return _ID_RE.fullmatch(value) is not None


def is_user_id(value: str) -> bool:
    """True for a valid user id (the whole string, as pydantic's pattern check)."""
    return _USER_RE.fullmatch(value) is not None


class EventType(StrEnum):
    PAGE_VIEW = "page_view"
    PRODUCT_VIEW = "product_view"
    SEARCH = "search"
    ADD_TO_CART = "add_to_cart"
    PURCHASE = "purchase"
    IMPRESSION = "impression"
    CLICK = "click"


PRODUCT_REQUIRED = frozenset(
    {EventType.PRODUCT_VIEW, EventType.ADD_TO_CART, EventType.PURCHASE, EventType.IMPRESSION, EventType.CLICK}
)
IMPRESSION_REQUIRED = frozenset({EventType.IMPRESSION, EventType.CLICK})

_RFC3339 = re.compile(
    r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$"
)
# A /-separated path of names that are not blank and hold no control characters.
_SEG = r"[^/\x00-\x1f]*[^/\s][^/\x00-\x1f]*"
_CATEGORY = re.compile(rf"{_SEG}(?:/{_SEG})*\Z")
# Year 1970 .. 9999 in epoch milliseconds.
_MAX_EPOCH_MS = 253_402_300_799_999
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


def parse_event_time(value: Any) -> int:
    """RFC 3339 string or integer epoch milliseconds -> epoch milliseconds."""
    if isinstance(value, bool):
        raise PydanticCustomError("wrong_type", "ts must be an RFC 3339 string or integer epoch ms")
    if isinstance(value, int):
        if not 0 <= value <= _MAX_EPOCH_MS:
            raise PydanticCustomError("out_of_range", "ts epoch milliseconds out of range")
        return value
    if isinstance(value, str):
        m = _RFC3339.fullmatch(value)
        if not m:
            raise PydanticCustomError("bad_format", "ts is not an RFC 3339 timestamp")
        text, frac = value, m.group(1)
        if frac and len(frac) > 7:  # fromisoformat takes at most microseconds (frac has its dot)
            text = value[:m.start(1)] + frac[:7] + value[m.end(1):]
        if text[10] != "T" or text[-1] == "z":  # the per-event hot path skips these
            text = text.replace(" ", "T").replace("t", "T").replace("z", "Z")
        try:
            dt = datetime.fromisoformat(text)
        except ValueError as exc:
            raise PydanticCustomError("bad_format", "ts is not a valid date/time") from exc
        ms = (dt - _EPOCH) // _MS  # exact integer milliseconds, floored
        if not 0 <= ms <= _MAX_EPOCH_MS:
            raise PydanticCustomError("out_of_range", "ts before 1970")
        return ms
    raise PydanticCustomError("wrong_type", "ts must be an RFC 3339 string or integer epoch ms")


EventTime = Annotated[int, BeforeValidator(parse_event_time)]


def format_ts(ms: int) -> str:
    """Epoch milliseconds -> RFC 3339 UTC with millisecond precision."""
    dt = datetime.fromtimestamp(ms / 1000, tz=UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def now_rfc3339() -> str:
    return datetime.now(tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Event(BaseModel):
    """One record of `livecopy.events`."""

    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)

    event_id: Id
    type: Annotated[EventType, Strict(False)]  # the enum from its JSON string, validated in Rust
    user_id: UserId
    ts: EventTime
    product_id: Id | None = None
    category: Annotated[str, StringConstraints(min_length=1, max_length=256)] | None = None
    price: Annotated[float, Field(ge=0, lt=1e9, allow_inf_nan=False)] | None = None
    quantity: Annotated[int, Field(ge=1, le=10_000)] | None = None
    query: Annotated[str, StringConstraints(max_length=512)] | None = None
    impression_id: Id | None = None
    copy_id: Id | None = None
    slot: Annotated[str, StringConstraints(max_length=64)] | None = None
    props: dict[str, Any] | None = None

    @field_validator("category")
    @classmethod
    def _category_path(cls, v: str | None) -> str | None:
        if v is not None and not _CATEGORY.match(v):
            raise PydanticCustomError("bad_format", "category must be a /-separated path of non-empty names")
        return v

    @field_validator("props")
    @classmethod
    def _props_size(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is None:
            return v
        try:
            size = len(orjson.dumps(v))
        except orjson.JSONEncodeError as exc:  # e.g. an integer beyond 64 bits: a record error, not a crash
            raise PydanticCustomError("out_of_range", "{e}", {"e": str(exc)}) from None
        if size > MAX_PROPS_BYTES:
            raise PydanticCustomError("too_long", "props is over 4 KiB serialized")
        return v

    @model_validator(mode="after")
    def _required_by_type(self) -> Event:
        if self.type in PRODUCT_REQUIRED and self.product_id is None:
            raise PydanticCustomError("missing", "product_id is required for {t}", {"t": self.type.value})
        if self.type == EventType.SEARCH and self.query is None:
            raise PydanticCustomError("missing", "query is required for search")
        if self.type in IMPRESSION_REQUIRED:
            if self.impression_id is None:
                raise PydanticCustomError(
                    "missing", "impression_id is required for {t}", {"t": self.type.value}
                )
            if self.copy_id is None:
                raise PydanticCustomError("missing", "copy_id is required for {t}", {"t": self.type.value})
        return self

    def to_json_dict(self) -> dict[str, Any]:
        """Contract JSON (ts as integer epoch ms), without absent optional fields."""
        d = self.model_dump(mode="json", exclude_none=True)
        return d


class Embedding(BaseModel):
    """The trunk's hidden state at the copy's EOS, as the generator computed it when it scored the copy
    (float16, base64): the online trainer's CTR-head refit reads it instead of re-running the trunk.
    ``trunk``: the version whose trunk weights produced it (head-only versions keep their parent's)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    trunk: str
    dtype: Literal["float16"] = "float16"
    data: Annotated[str, StringConstraints(max_length=16_384)]

    @classmethod
    def pack(cls, vector: Any, trunk: str) -> Embedding:
        import numpy as np

        return cls(trunk=trunk, data=base64.b64encode(np.asarray(vector, dtype="<f2").tobytes()).decode("ascii"))

    def vector(self) -> Any:
        """The vector as float32 (numpy)."""
        import numpy as np

        return np.frombuffer(base64.b64decode(self.data), dtype="<f2").astype(np.float32)


class GeneratedCopy(BaseModel):
    """`livecopy.copy` record and the body of `GET /v1/copy`."""

    model_config = ConfigDict(extra="ignore")

    copy_id: str
    user_id: str
    product_id: str
    text: Annotated[str, StringConstraints(max_length=MAX_COPY_CHARS)]
    model: str
    model_version: str
    score: Annotated[float, Field(ge=0.0, le=1.0)]
    policy: str
    created_at: str
    # Optional extensions (allowed by the contract: optional fields only).
    propensity: float | None = None
    slot: str | None = None
    style: str | None = None
    features: dict[str, Any] | None = None
    template: Annotated[str, StringConstraints(max_length=MAX_COPY_CHARS)] | None = None  # slotted form of text
    embedding: Embedding | None = None  # internal: kept with the copy for the trainer, never in an HTTP answer


class FeedbackRecord(BaseModel):
    """`livecopy.feedback`: one labelled impression."""

    model_config = ConfigDict(extra="ignore")

    impression_id: str
    copy_id: str
    user_id: str
    product_id: str
    model_version: str
    text: str
    clicked: bool
    impression_ts: str
    click_ts: str | None = None
    features: dict[str, Any] = Field(default_factory=dict)
    model: str | None = None
    policy: str | None = None
    propensity: float | None = None
    score: float | None = None
    style: str | None = None
    template: str | None = None  # the copy's slotted form (what a slotted model learns from)
    slot: str | None = None
    embedding: Embedding | None = None  # the trunk's hidden state at EOS when the copy was scored


class Profile(BaseModel):
    """`GET /v1/profile/{user_id}` body."""

    user_id: str
    event_counts: dict[str, int]
    category_affinity: dict[str, float]
    recent_products: list[str]
    first_seen: str
    last_seen: str
    cart_value: float
    purchase_value: float
    profile_version: int


class ModelVersion(BaseModel):
    """`livecopy.model-updates` record: a new version generators should load."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    name: str
    version: str
    parent_version: str | None = None
    path: str
    created_at: str
    metrics: dict[str, Any] = Field(default_factory=dict)
    action: str = "promote"  # promote | rollback
