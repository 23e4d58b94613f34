"""The Grafana dashboard (grafana/kvpool.json): well-formed as Grafana imports it, and every metric and label its
panels query is one the running app exports on its node's Prometheus endpoint (Ray's metrics export port)."""

import importlib
import inspect
import json
import re
import time
from pathlib import Path

import httpx
import ray

DASHBOARD = Path(__file__).parent.parent / "grafana" / "kvpool.json"
DATASOURCE = "${datasource}"
# Labels that name one cluster's machines or processes: a dashboard that filters on them works nowhere else.
CLUSTER_LABELS = {"instance", "job", "NodeAddress", "SessionName", "WorkerId"}
# Counters Ray exports only from their first increment on, of events a healthy run never has (a lost KV-event
# batch, a full engine KV cache, a pool over its budget): checked against their definition instead, as (module, name
# as defined there).
ON_FIRST_EVENT = {
    "ray_kvpool_event_gaps_total": ("actors.router", "kvpool_event_gaps"),
    "ray_vllm_num_preemptions_total": ("vllm.v1.metrics.loggers", "vllm:num_preemptions"),
    "ray_kvpool_pool_moved_blocks_total": ("actors.pool", "kvpool_pool_moved_blocks"),  # (a pool within budget)
}
PROMQL_WORDS = {"and", "or", "unless", "bool", "offset"}


def load() -> dict:
    return json.loads(DASHBOARD.read_text())


def queries(dash: dict) -> list[tuple[dict, dict]]:
    """(panel, target) for every query of the dashboard."""
    return [(p, t) for p in dash["panels"] for t in p.get("targets", [])]


def metric_names(expr: str) -> set[str]:
    """The metrics a PromQL expression reads: identifiers that are no function, keyword, label or range."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    return {m.group() for m in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr)
            if not expr[m.end():].lstrip().startswith("(") and m.group() not in PROMQL_WORDS}


def labels_used(target: dict) -> set[str]:
    """The labels a query filters or groups on, or names in its legend."""
    expr = target["expr"]
    used = {name for inner in re.findall(r"\{([^}]*)\}", expr) for name in re.findall(r"(\w+)\s*[=!]", inner)}
    used |= {name.strip() for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr)
             for name in group.split(",") if name.strip()}
    return used | set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))


def parse_scrape(text: str) -> dict[str, set[str]]:
    """Prometheus text format: metric name -> the label names its samples carry."""
    found: dict[str, set[str]] = {}
    for line in text.splitlines():
        m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s", line)
        if m:
            found.setdefault(m.group(1), set()).update(re.findall(r'(\w+)="(?:[^"\\]|\\.)*"', m.group(2) or ""))
    return found


def exported_counter(defined: str) -> str:
    """The name Ray exports a `ray.util.metrics.Counter` under (vLLM's wrappers turn ':' into '_' first)."""
    return f"ray_{re.sub(r'[^a-zA-Z0-9_]', '_', defined)}_total"


def problems(dash: dict, scraped: dict[str, set[str]]) -> list[str]:
    """What the dashboard queries that the scrape does not have: metrics, then labels of metrics it has."""
    found = []
    for panel, target in queries(dash):
        names = metric_names(target["expr"])
        missing = {n for n in names if n not in scraped and n not in ON_FIRST_EVENT}
        found += [f"panel {panel['title']!r}: metric {n} is not exported" for n in sorted(missing)]
        present = [scraped[n] for n in names if n in scraped]
        if present:
            found += [f"panel {panel['title']!r}: no metric of {sorted(names)} has label {label!r}"
                      for label in sorted(labels_used(target)) if not any(label in have for have in present)]
    return found


def router_replicas(url: str) -> dict:
    """The router's per-replica stats; reading them also refreshes its indexed-blocks gauge. Empty while the router
    is too busy to answer the ingress in time (the stats then say `error`)."""
    r = httpx.get(f"{url}/v1/kvpool/stats", timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["router"].get("replicas", {})


def test_dashboard_is_well_formed_for_grafana():
    dash = load()
    assert dash["uid"] == "kvpool-overview" and dash["title"] and dash["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in dash["panels"]]
    assert all(isinstance(i, int) for i in ids) and len(set(ids)) == len(ids), ids
    cells = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        assert all(isinstance(g[k], int) for k in ("h", "w", "x", "y")) and g["x"] >= 0 and g["x"] + g["w"] <= 24, p
        mine = {(g["x"] + dx, g["y"] + dy) for dx in range(g["w"]) for dy in range(g["h"])}
        assert not mine & cells, f"panel {p['title']!r} overlaps another"
        cells |= mine
        if p["type"] in ("row", "text"):
            assert "targets" not in p, p["title"]
            continue
        assert p["datasource"]["uid"] == DATASOURCE and p["targets"], p["title"]
        ref_ids = [t["refId"] for t in p["targets"]]
        assert len(set(ref_ids)) == len(ref_ids), p["title"]
    for panel, target in queries(dash):
        assert target["datasource"]["uid"] == DATASOURCE, panel["title"]
        assert metric_names(target["expr"]), f"panel {panel['title']!r} reads no metric: {target['expr']}"
        assert not labels_used(target) & CLUSTER_LABELS, f"panel {panel['title']!r} names a cluster's machines"
    # The parser reads what it should: metrics, not functions, labels or Grafana's range macro.
    assert metric_names('sum by (le) (rate(a_b_bucket{source="x"}[$__rate_interval])) / on (le) c:d') == {
        "a_b_bucket", "c:d"}


def test_every_metric_the_dashboard_queries_is_exported(tiny_app):
    url, _ = tiny_app
    dash = load()
    # Both replicas in the router's view first: one that has just started may not have its KV events indexed.
    deadline = time.monotonic() + 180
    while sum(r["live"] for r in router_replicas(url).values()) < 2:
        assert time.monotonic() < deadline, router_replicas(url)
        time.sleep(0.5)
    # Requests that share a prefix, until one is served from a cache, so that cached and predicted tokens count as
    # well as prompt tokens.
    prefix = "agents read files run tests and write code " * 12
    served = []
    for turn in range(6):
        body = {"model": "tiny", "prompt": prefix + f"then turn {turn}", "max_tokens": 4, "temperature": 0}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        served.append((r.headers["x-kvpool-replica"], r.headers["x-kvpool-route-reason"],
                       r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]))
        if served[-1][2]:
            break
    assert served[-1][2] > 0, served
    # The fixture's Ray runs without its dashboard: each node's metrics agent serves the port all the same.
    endpoints = [f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics" for n in ray.nodes()
                 if n["Alive"]]
    assert endpoints
    # Workers report their metrics to the agent every few seconds, and a gauge that is not set again for two reports
    # leaves the scrape (the router's and vLLM's gauges change only under traffic): what the scrapes since the
    # requests showed counts.
    deadline = time.monotonic() + 120
    scraped: dict[str, set[str]] = {}
    while True:
        router_replicas(url)  # sets the router's indexed-blocks gauge again
        for endpoint in endpoints:
            for name, labels in parse_scrape(httpx.get(endpoint, timeout=10).text).items():
                scraped.setdefault(name, set()).update(labels)
        found = problems(dash, scraped)
        if not found or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert not found, "\n".join(found)
    # The counters only an incident exports are defined where the table says, under the name Ray gives them,
    # the name rule being the one the exported counters follow.
    assert exported_counter("kvpool_prompt_tokens") in scraped and exported_counter("vllm:prompt_tokens") in scraped
    for exported, (module, defined) in ON_FIRST_EVENT.items():
        source = inspect.getsource(importlib.import_module(module))
        assert re.search(rf'(?:Counter|_counter_cls)\(\s*(?:name=)?"{re.escape(defined)}"', source), defined
        assert exported_counter(defined) == exported
    assert {n for _, t in queries(dash) for n in metric_names(t["expr"])} >= set(ON_FIRST_EVENT)
