"""Request and response models of the REST API (they make the OpenAPI document)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Status = Literal["placed", "acknowledged", "shipped", "installed", "cancelled"]
Priority = Literal["P1", "P2", "P3"]
Role = Literal["operator", "analyst", "admin"]
HealthStatus = Literal["ok", "warning", "alert"]
CancelCode = Literal["false_alarm", "duplicate", "not_needed", "other"]


class Problem(BaseModel):
    """An error answer: a human-readable message."""

    detail: str | list[Any]


class Order(BaseModel):
    """A replacement-part order."""

    model_config = ConfigDict(extra="allow")
    id: int
    tractor_id: str
    part_id: str
    episode_id: str
    status: Status
    priority: Priority
    placed_at: datetime
    updated_at: datetime
    alert_count: int
    last_alert_at: datetime
    ttf_h: float | None = Field(None, description="forecast hours to failure at the newest alert")
    expected_delivery: datetime | None = None
    cost_eur: float
    evidence: dict[str, Any] = Field(description="signal, level, slope, forecast and trend window ids")
    cancel_reason: str | None = None
    cancel_code: str | None = None
    signal: str | None = None
    lead_time_h: float | None = None
    acknowledged_at: datetime | None = None
    shipped_at: datetime | None = None
    installed_at: datetime | None = None
    cancelled_at: datetime | None = None


class OrderPage(BaseModel):
    """One page of orders and the total matching the filters."""

    items: list[Order]
    total: int
    limit: int
    offset: int


class OrderEvent(BaseModel):
    """One entry of an order's audit trail."""

    id: int
    order_id: int
    at: datetime
    kind: str
    actor: str
    from_status: str | None = None
    to_status: str | None = None
    detail: dict[str, Any] | None = None


class Part(BaseModel):
    """A catalog part."""

    model_config = ConfigDict(extra="allow")
    part_id: str
    name: str
    signal: str
    direction: Literal["falling", "rising"]
    nominal: float
    warning_threshold: float
    failure_threshold: float
    lead_time_h: float
    price_eur: float


class PartPatch(BaseModel):
    """Catalog fields an admin may change (the catalog file wins again at the next ``db upgrade``)."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(None, min_length=1, max_length=200)
    lead_time_h: float | None = Field(None, gt=0, le=24 * 365)
    price_eur: float | None = Field(None, ge=0, le=1e7)


class OrderDetail(Order):
    """An order with its history, catalog part and what it may become next."""

    history: list[OrderEvent]
    part: Part | None
    allowed_next: list[Status]


class TransitionIn(BaseModel):
    """A requested status change."""

    model_config = ConfigDict(extra="forbid")
    to: Status = Field(description="the new status")
    reason: str | None = Field(None, max_length=2000, description="required when cancelling")
    cancel_code: CancelCode | None = Field(None, description="why it was cancelled (kept for analysts)")
    note: str | None = Field(None, max_length=2000)


class PartHealth(BaseModel):
    """Latest health of one part of one tractor (from the trend tables)."""

    part_id: str
    signal: str
    level: float
    health: float = Field(description="1 = as new, 0 = at the failure threshold")
    slope_per_h: float | None = None
    ttf_h: float | None = None
    ttf_lo_h: float | None = None
    status: str
    as_of: datetime


class TractorSummary(BaseModel):
    """A tractor with its parts' health, worst first."""

    tractor_id: str
    worst_health: float
    alerts: int
    warnings: int
    parts: list[PartHealth]


class TractorPage(BaseModel):
    """One page of tractors."""

    items: list[TractorSummary]
    total: int
    limit: int
    offset: int


class TractorDetail(BaseModel):
    """One tractor: part health and its orders."""

    tractor_id: str
    parts: list[PartHealth]
    orders: list[Order]


class PartStatusCount(BaseModel):
    """How many tractors have a part in each health status."""

    part_id: str
    ok: int
    warning: int
    alert: int


class FleetSummary(BaseModel):
    """Fleet overview: tractors, part health counts and open orders."""

    tractors: int
    parts: list[PartStatusCount]
    open_orders: dict[str, int]


class TrendWindow(BaseModel):
    """One closed window of a signal."""

    window_start: datetime
    window_end: datetime
    count: int
    mean: float
    min: float
    max: float
    norm_value: float | None = Field(None, description="value at the reference operating point")
    slope_per_h: float | None = None


class TrendSeries(BaseModel):
    """A tractor's signal over time with the thresholds of the parts it watches and the latest trend."""

    tractor_id: str
    signal: str
    windows: list[TrendWindow]
    parts: list[Part]
    health: list[PartHealth]


class Me(BaseModel):
    """The caller's token."""

    token_id: int
    name: str
    role: Role
    rights: list[str]


class TokenIn(BaseModel):
    """A token to create."""

    model_config = ConfigDict(extra="forbid")
    role: Role
    name: str = Field(min_length=1, max_length=100)


class TokenInfo(BaseModel):
    """A token without its secret."""

    id: int
    name: str
    role: Role
    created_at: datetime
    revoked_at: datetime | None = None


class TokenCreated(TokenInfo):
    """A new token; ``token`` is shown only this once."""

    token: str
