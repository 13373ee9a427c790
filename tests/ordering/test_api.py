"""REST API: every endpoint, role rules, filters, the lifecycle and its audit trail, 4xx on bad input."""

from __future__ import annotations

import csv
import io
import json

from ordering_fixtures import Api
from sqlalchemy import select

from functions import store
from ordering.tables import api_tokens, part_replacements


def test_no_or_bad_token_is_401_everywhere(api: Api) -> None:
    for path in ("/api/orders", "/api/orders/1", "/api/orders.csv", "/api/fleet", "/api/tractors", "/api/parts",
                 "/api/tractors/T00001", "/api/tractors/T00001/trends/oil_pressure_kpa", "/api/me", "/api/tokens"):
        assert api.client.get(path).status_code == 401, path
        r = api.client.get(path, headers={"Authorization": "Bearer fw_nope"})
        assert r.status_code == 401 and "token" in r.json()["detail"]
    assert api.client.post("/api/orders/1/transitions", json={"to": "acknowledged"}).status_code == 401
    assert api.client.get("/api/health").json() == {"status": "ok"}


def test_me_reports_role_and_rights(api: Api) -> None:
    r = api.client.get("/api/me", headers=api.h("analyst"))
    assert r.status_code == 200
    assert r.json()["role"] == "analyst" and r.json()["rights"] == ["read"]


def test_list_orders_filters_sort_and_pagination(api: Api) -> None:
    c, h = api.client, api.h("analyst")
    page = c.get("/api/orders", headers=h).json()
    assert page["total"] == 3 and [o["tractor_id"] for o in page["items"]] == ["T00003", "T00002", "T00001"]
    assert c.get("/api/orders?priority=P1", headers=h).json()["items"][0]["part_id"] == "OIL-PUMP"
    assert c.get("/api/orders?tractor_id=T00002", headers=h).json()["total"] == 1
    assert c.get("/api/orders?part_id=DPF&status=placed", headers=h).json()["total"] == 1
    assert c.get("/api/orders?status=installed", headers=h).json()["total"] == 0
    both = c.get("/api/orders?priority=P1&priority=P3", headers=h).json()
    assert {o["priority"] for o in both["items"]} == {"P1", "P3"}
    since = c.get("/api/orders?placed_from=2026-11-05T05:30:00%2B01:00", headers=h).json()  # = 04:30Z
    assert [o["tractor_id"] for o in since["items"]] == ["T00003", "T00002"]
    by_ttf = c.get("/api/orders?sort=ttf_h", headers=h).json()["items"]
    assert [o["ttf_h"] for o in by_ttf] == [41.0, 300.0, 900.0]
    second = c.get("/api/orders?sort=tractor_id&limit=1&offset=1", headers=h).json()
    assert second["total"] == 3 and [o["tractor_id"] for o in second["items"]] == ["T00002"]


def test_order_carries_priority_cost_delivery_and_evidence(api: Api) -> None:
    o = api.client.get("/api/orders?tractor_id=T00001", headers=api.h("operator")).json()["items"][0]
    assert o["priority"] == "P1"  # 41 h to failure < 120 h lead time
    assert o["cost_eur"] > 0 and o["lead_time_h"] == 120.0 and o["signal"] == "oil_pressure_kpa"
    assert o["expected_delivery"].startswith("2026-11-10T04:00")  # placed 11-05 04:00 + 120 h
    assert o["evidence"]["window_ids"] and o["evidence"]["slope_per_h"] == -1.2


def test_csv_export_has_every_matching_order(api: Api) -> None:
    r = api.client.get("/api/orders.csv?sort=tractor_id", headers=api.h("analyst"))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert [row["tractor_id"] for row in rows] == ["T00001", "T00002", "T00003"]
    assert rows[0]["status"] == "placed" and float(rows[0]["cost_eur"]) > 0


def test_order_detail_has_history_part_and_next_steps(api: Api) -> None:
    r = api.client.get("/api/orders/1", headers=api.h("analyst"))
    assert r.status_code == 200
    d = r.json()
    assert d["part"]["failure_threshold"] == 150.0 and d["allowed_next"] == ["acknowledged", "cancelled"]
    assert [e["kind"] for e in d["history"]] == ["placed"]
    assert api.client.get("/api/orders/999", headers=api.h("analyst")).status_code == 404


def test_full_lifecycle_audit_outbox_and_replacement(api: Api) -> None:
    c, h = api.client, api.h("operator")
    for to in ("acknowledged", "shipped", "installed"):
        r = c.post("/api/orders/1/transitions", json={"to": to, "note": f"now {to}"}, headers=h)
        assert r.status_code == 200, r.text
        assert r.json()["status"] == to and r.json()[f"{to}_at"]
    d = c.get("/api/orders/1", headers=h).json()
    assert [(e["from_status"], e["to_status"]) for e in d["history"]] == [
        (None, "placed"), ("placed", "acknowledged"), ("acknowledged", "shipped"), ("shipped", "installed")]
    assert d["history"][1]["actor"] == "api:test operator" and d["allowed_next"] == []
    with api.sessions() as s:
        repl = s.execute(select(part_replacements)).all()
        assert [(r.tractor_id, r.part_id, r.order_id) for r in repl] == [("T00001", "OIL-PUMP", 1)]
        published = [json.loads(r.value) for r in store.pending(s, "ordering-api")]
    assert [m["event"] for m in published] == ["acknowledged", "shipped", "installed"]
    assert all(m["order"]["id"] == 1 and m["event_id"] for m in published)
    assert published[-1]["order"]["status"] == "installed"


def test_illegal_transitions_are_refused_with_a_reason(api: Api) -> None:
    c, h = api.client, api.h("operator")
    r = c.post("/api/orders/1/transitions", json={"to": "installed"}, headers=h)
    assert r.status_code == 409 and "placed; it cannot become installed" in r.json()["detail"]
    r = c.post("/api/orders/1/transitions", json={"to": "cancelled"}, headers=h)
    assert r.status_code == 422 and "reason" in r.json()["detail"]
    r = c.post("/api/orders/1/transitions", json={"to": "cancelled", "reason": "sensor was loose",
                                                  "cancel_code": "false_alarm"}, headers=h)
    assert r.status_code == 200 and r.json()["cancel_code"] == "false_alarm"
    r = c.post("/api/orders/1/transitions", json={"to": "acknowledged"}, headers=h)
    assert r.status_code == 409 and "closed" in r.json()["detail"]
    assert c.post("/api/orders/1/transitions", json={"to": "lost"}, headers=h).status_code == 422
    assert c.post("/api/orders/42/transitions", json={"to": "acknowledged"}, headers=h).status_code == 404
    with api.sessions() as s:
        assert [json.loads(r.value)["event"] for r in store.pending(s, "ordering-api")] == ["cancelled"]


def test_analyst_cannot_act_and_only_admin_manages(api: Api) -> None:
    c = api.client
    r = c.post("/api/orders/1/transitions", json={"to": "acknowledged"}, headers=api.h("analyst"))
    assert r.status_code == 403 and "operator or admin" in r.json()["detail"]
    assert c.get("/api/orders/1", headers=api.h("analyst")).json()["status"] == "placed"
    assert c.get("/api/tokens", headers=api.h("operator")).status_code == 403
    assert c.patch("/api/parts/DPF", json={"price_eur": 1.0}, headers=api.h("operator")).status_code == 403
    assert c.post("/api/orders/1/transitions", json={"to": "acknowledged"}, headers=api.h("admin")).status_code == 200


def test_tokens_are_hashed_created_listed_and_revoked(api: Api) -> None:
    c, h = api.client, api.h("admin")
    r = c.post("/api/tokens", json={"role": "analyst", "name": "pandas notebook"}, headers=h)
    assert r.status_code == 201
    new = r.json()
    assert c.get("/api/me", headers={"Authorization": f"Bearer {new['token']}"}).json()["role"] == "analyst"
    with api.sessions() as s:
        hashes = [row.token_hash for row in s.execute(select(api_tokens))]
    assert new["token"] not in hashes and len(hashes) == 4
    listed = c.get("/api/tokens", headers=h).json()
    assert "token" not in listed[0] and any(t["name"] == "pandas notebook" for t in listed)
    assert c.delete(f"/api/tokens/{new['id']}", headers=h).status_code == 204
    assert c.get("/api/me", headers={"Authorization": f"Bearer {new['token']}"}).status_code == 401
    assert c.delete(f"/api/tokens/{new['id']}", headers=h).status_code == 404
    assert c.post("/api/tokens", json={"role": "root", "name": "x"}, headers=h).status_code == 422


def test_parts_catalog_read_and_admin_patch(api: Api) -> None:
    c = api.client
    catalog = c.get("/api/parts", headers=api.h("analyst")).json()
    assert {p["part_id"] for p in catalog} >= {"OIL-PUMP", "BEARING", "DPF"}
    r = c.patch("/api/parts/DPF", json={"price_eur": 999.0}, headers=api.h("admin"))
    assert r.status_code == 200 and r.json()["price_eur"] == 999.0
    assert c.patch("/api/parts/NOPE", json={"price_eur": 1.0}, headers=api.h("admin")).status_code == 404
    assert c.patch("/api/parts/DPF", json={"price_eur": -1}, headers=api.h("admin")).status_code == 422


def test_fleet_overview_and_tractors_worst_first(api: Api) -> None:
    c, h = api.client, api.h("operator")
    fleet = c.get("/api/fleet", headers=h).json()
    assert fleet["tractors"] == 6 and fleet["open_orders"]["placed"] == 3
    oil = next(p for p in fleet["parts"] if p["part_id"] == "OIL-PUMP")
    assert (oil["alert"], oil["ok"]) == (1, 5)
    page = c.get("/api/tractors?limit=2", headers=h).json()
    assert page["total"] == 6 and [t["tractor_id"] for t in page["items"]] == ["T00001", "T00002"]
    assert page["items"][0]["alerts"] == 1 and page["items"][0]["parts"][0]["part_id"] == "OIL-PUMP"
    assert [t["tractor_id"] for t in c.get("/api/tractors?status=warning", headers=h).json()["items"]] == ["T00002"]
    assert c.get("/api/tractors?q=T0000&sort=tractor_id&offset=5", headers=h).json()["items"][0]["tractor_id"] == \
        "T00006"
    detail = c.get("/api/tractors/T00001", headers=h).json()
    assert len(detail["parts"]) == 2 and detail["orders"][0]["part_id"] == "OIL-PUMP"
    assert c.get("/api/tractors/T09999", headers=h).status_code == 404


def test_trend_series_has_windows_thresholds_and_fit(api: Api) -> None:
    c, h = api.client, api.h("analyst")
    s = c.get("/api/tractors/T00001/trends/oil_pressure_kpa?limit=48", headers=h).json()
    assert len(s["windows"]) == 48 and s["windows"][0]["window_start"] < s["windows"][-1]["window_start"]
    assert s["parts"][0]["failure_threshold"] == 150.0 and s["health"][0]["ttf_h"] == 41.0
    assert c.get("/api/tractors/T00001/trends/not_a_signal", headers=h).status_code == 404
    assert c.get("/api/tractors/T00001/trends/Bad-Signal", headers=h).status_code == 422


def test_bad_input_is_4xx_with_a_message(api: Api) -> None:
    c, h = api.client, api.h("admin")
    for path in ("/api/orders?limit=0", "/api/orders?limit=100000", "/api/orders?status=lost",
                 "/api/orders?sort=;drop", "/api/orders?placed_from=yesterday", "/api/orders/abc",
                 f"/api/orders/{2**70}", "/api/orders?offset=-1", f"/api/orders?offset={2**70}",
                 "/api/orders?placed_from=0001-01-01T00:00:00%2B14:00",
                 "/api/tractors/T00001/trends/oil_pressure_kpa?since=9999-12-31T23:59:59-14:00"):
        r = c.get(path, headers=h)
        assert r.status_code == 422, path
        assert isinstance(r.json()["detail"], str) and r.json()["detail"], path
    r = c.post("/api/orders/1/transitions", content=b"{not json", headers={**h, "Content-Type": "application/json"})
    assert r.status_code == 422
    r = c.post("/api/orders/1/transitions", json={"to": "acknowledged", "colour": "red"}, headers=h)
    assert r.status_code == 422 and "colour" in r.json()["detail"]


def test_operator_page_and_static_files_are_served_without_cdn(api: Api) -> None:
    page = api.client.get("/")
    assert page.status_code == 200 and "Fleetwatch" in page.text
    assert "http://" not in page.text and "https://" not in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert api.client.get("/openapi.json").json()["info"]["title"] == "Fleetwatch orders"
    for asset in ("app.js", "chart.js", "app.css"):
        r = api.client.get(f"/static/{asset}")
        assert r.status_code == 200 and "https://" not in r.text, asset
