"""Merges on the serving path: model strings to selections (names.py), the pool's adapters and bases on the
compose device (basis_store.py), and the composed-adapter cache that vLLM loads merges from
(adapter_cache.py). May import `cluster/` and the merge core."""
