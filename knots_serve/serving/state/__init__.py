"""What the replicas of one deployment share and keep: the store contract (store.py) and its backends
(sqlite_store.py, redis_store.py; chosen by backends.py), the task and experiment tables over the config
(registry.py), experiments, their assignment, outcomes and promotion rule (experiments.py). May import
`merges/` (model names) and the merge core."""
