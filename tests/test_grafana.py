"""The Grafana dashboard (configs/grafana/knots-serve.json) against the real server's /metrics: it imports on any
Prometheus, every series its queries read is exported, and every knots_* metric exported has a panel."""

import json
import re
import urllib.request
from pathlib import Path

import pytest
from test_serving import PROMPTS, http

DASHBOARD = Path(__file__).parents[1] / "configs" / "grafana" / "knots-serve.json"
# an "export for sharing externally": the importer picks the Prometheus, which fills this input
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
# metric names in PromQL, ours and vLLM's (PromQL allows colons in names); quoted label values ("knots-ta", a
# regex) are blanked first, so that they are never read as names
NAME = re.compile(r"\b(?:knots_|vllm:)[A-Za-z0-9_:]*")
STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def load() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(dash):
    for p in dash["panels"]:
        yield p
        yield from p.get("panels", [])  # a collapsed row holds its panels


def graphs(dash):
    return [p for p in all_panels(dash) if p["type"] != "row"]


def exprs(dash):
    return [t["expr"] for p in graphs(dash) for t in p["targets"]]


def names(expr: str) -> set[str]:
    return set(NAME.findall(STRING.sub('""', expr)))


def datasources(node):
    """Every `datasource` anywhere under node: one left pointing at the exporter's own Prometheus breaks import."""
    if isinstance(node, dict):
        if "datasource" in node:
            yield node["datasource"]
        for v in node.values():
            yield from datasources(v)
    elif isinstance(node, list):
        for v in node:
            yield from datasources(v)


@pytest.fixture(scope="module")
def exposition(server):
    """(sample names, {family: type}) of /metrics, after requests that give every labelled knots_* series a
    sample: a labelled series is exported only once something was counted under its labels."""
    c = server.client()
    c.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=2)
    for _ in range(2):  # a cache miss (unless an earlier test composed it) and a hit
        c.completions.create(model="tasks:alpha+beta@knots-ta", prompt=PROMPTS[0], max_tokens=2)
    c.completions.create(model="exp", prompt=PROMPTS[0], max_tokens=2)
    # an arm's request that vLLM refuses (knots_ab_errors), and one the merge layer refuses (knots_request_errors)
    assert http(server, "POST", "/v1/completions", {"model": "exp", "prompt": "x", "max_tokens": 10**6})[0] == 400
    assert http(server, "POST", "/v1/completions", {"model": "tasks:nosuch", "prompt": "x"})[0] == 404
    lines = urllib.request.urlopen(f"{server.url}/metrics").read().decode().splitlines()
    samples = {line.split("{")[0].split(" ")[0] for line in lines if line and not line.startswith("#")}
    types = dict(line.split()[2:4] for line in lines if line.startswith("# TYPE "))
    return samples, types


def test_the_dashboard_imports_as_is_on_one_prometheus_input():
    dash = load()
    assert [(i["name"], i["type"], i["pluginId"]) for i in dash["__inputs"]] == [
        ("DS_PROMETHEUS", "datasource", "prometheus")
    ]
    assert ("datasource", "prometheus") in [(r["type"], r["id"]) for r in dash["__requires"]]
    assert dash["id"] is None  # the importer gives it one
    ids = [p["id"] for p in all_panels(dash)]
    assert len(ids) == len(set(ids)), ids
    assert graphs(dash) and all(p["datasource"] == DATASOURCE and p["targets"] for p in graphs(dash))
    rest = {k: v for k, v in dash.items() if k != "annotations"}  # Grafana's built-in annotations have their own
    assert all(d == DATASOURCE for d in datasources(rest))
    assert [v["name"] for v in dash["templating"]["list"]] == ["model_name", "experiment"]


def test_quantiles_are_taken_per_bucket_bound():
    """histogram_quantile over buckets summed without `le` returns nothing: an empty panel, not an error."""
    bucketed = [e for e in exprs(load()) if "_bucket" in e]
    assert bucketed
    for e in bucketed:
        assert e.startswith("histogram_quantile(") and re.search(r"sum by \(le\b", e), e


def test_every_series_the_dashboard_reads_is_on_the_real_server(exposition):
    samples, _ = exposition
    dash = load()
    read = set().union(*map(names, exprs(dash)), *(names(v["query"]["query"]) for v in dash["templating"]["list"]))
    assert any(n.startswith("vllm:") for n in read) and any(n.startswith("knots_") for n in read)
    assert not read - samples, sorted(read - samples)


def test_counters_are_read_as_rates(exposition):
    """A counter plotted raw climbs for ever and drops at each restart."""
    _, types = exposition
    counters = {n for n, t in types.items() if t == "counter"}
    read = 0
    for e in exprs(load()):
        plain = STRING.sub('""', e)
        for m in NAME.finditer(plain):
            if m.group() in counters:
                read += 1
                assert plain[: m.start()].endswith(("rate(", "increase(")), (m.group(), e)
    assert read


def test_every_knots_metric_the_server_exports_has_a_panel(exposition):
    _, types = exposition
    # prometheus_client adds a <name>_created gauge per counter and histogram: a start time, nothing to graph
    created = {f"{n.removesuffix('_total')}_created" for n, t in types.items() if t in ("counter", "histogram")}
    ours = {n for n in types if n.startswith("knots_")} - created
    read = set().union(*map(names, exprs(load())))
    # a histogram family is read through its _bucket, _count or _sum series
    unread = {f for f in ours if not read & {f, f"{f}_bucket", f"{f}_count", f"{f}_sum"}}
    assert ours and not unread, sorted(unread)
