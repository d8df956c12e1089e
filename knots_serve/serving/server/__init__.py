"""The orchestration: `KnotsServer` (hub.py), one per API server process, composed of parts with one job
each: the task pool and its changes (pool.py), request routing to merges (routing.py), experiments and
recipes (experiments.py), pins (pins.py), the sync with the shared store (sync.py); plus the serve config
(config.py), the drain gate and the new-merge rate limit. May import `state/`, `merges/`, `engine/`,
`cluster/` and the merge core; never the HTTP edge."""
