"""Prometheus metrics of the merge layer; vLLM's /metrics serves them with its own (default registry)."""

from prometheus_client import Counter, Gauge, Histogram

COMPOSE_SECONDS = Histogram(
    "knots_compose_seconds",
    "time to compose and write one merged adapter",
    buckets=(0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30, 100),
)
NEW_MERGE_STAGE = Histogram(
    "knots_new_merge_stage_seconds",
    "a never-seen merge's stages on the server: plan (its bounds checked), compose, write (the adapter files), "
    "or fleet (its files loaded from another replica's compose, waiting for it included: merges/fleet.py); "
    "vLLM's load of them follows, in the engine",
    ["stage"],
    buckets=(0.0001, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1, 3, 10),
)
COMPOSE_RUNNING = Gauge("knots_compose_running", "merges being composed now")
COMPOSE_QUEUE = Gauge("knots_compose_queue_depth", "new merges waiting for a compose slot")
COMPOSE_BUSY = Counter("knots_compose_busy", "new merges refused (503, Retry-After) because too many were pending")
CACHE = Counter(
    "knots_compose_cache",
    "composed-adapter cache lookups (hit, miss, wait: joined a compose already under way; linked: a miss served "
    "by another API server's compose of it, group.py; speculative: a compose ahead of any request, speculate.py)",
    ["result"],
)
SPECULATIVE = Counter(
    "knots_speculative",
    "merges composed ahead of any request while idle (speculate.py), by outcome: composed; hit: a request then "
    "used it; wasted: evicted or dropped before any request did",
    ["outcome"],
)
for _outcome in ("composed", "hit", "wasted"):  # each series exists from the start
    SPECULATIVE.labels(_outcome)
FLEET = Counter(
    "knots_fleet_merges",
    "new merges by where their files came from (merges/fleet.py): composed here, or loaded from another "
    "replica's publication; published: shared with the fleet; unshared: too large for the store and no "
    "fleet_dir; error: the fleet's store or directory could not be reached (the merge composed here)",
    ["outcome"],
)
for _outcome in ("composed", "loaded", "published", "unshared", "error"):
    FLEET.labels(_outcome)
CACHE_EVICTIONS = Counter(
    "knots_compose_cache_evictions", "composed merges evicted (bound in bytes or a full cache_dir)"
)
CACHE_BYTES = Gauge("knots_compose_cache_bytes", "bytes of composed adapters in the tmpfs cache")
REQUESTS = Counter("knots_requests", "inference requests per selected merge, task or named merge", ["model"])
ERRORS = Counter("knots_request_errors", "requests refused by the merge layer", ["status"])

AB = ["experiment", "arm"]
AB_REQUESTS = Counter("knots_ab_requests", "experiment requests per arm", AB)
AB_ERRORS = Counter("knots_ab_errors", "experiment requests per arm that ended in an HTTP error", AB)
AB_TOKENS = Counter("knots_ab_tokens", "completion tokens per experiment arm", AB)
AB_TTFT = Histogram("knots_ab_ttft_seconds", "time to the first response byte per experiment arm", AB)
AB_LATENCY = Histogram("knots_ab_latency_seconds", "total request time per experiment arm", AB)

PINNED = Gauge("knots_pinned", "1 while a merge is written into the engine's weights, 0 on the base weights")
PIN_SECONDS = Histogram(
    "knots_pin_seconds",
    "pins and unpins by phase: prepare (the workers load the merge), drain (requests in flight finish, new ones "
    "wait), swap (the weights written)",
    ["phase"],
    buckets=(0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30, 100),
)
for _phase in ("prepare", "drain", "swap"):  # each phase's series exists from the start (0 until a pin)
    PIN_SECONDS.labels(_phase)
