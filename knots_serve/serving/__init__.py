"""The serving layer: per-request merges on vLLM's OpenAI server. One room per responsibility; imports go
only downward in this list (`make lint` checks it with import-linter, contracts in pyproject.toml):

- `plugin.py`: vLLM's entry points; wires the rooms below into vLLM's API server and workers.
- `http/`: the HTTP edge: admin routes, the request middleware, auth, per-arm response labels.
- `server/`: the orchestration: `KnotsServer` (hub.py) composed of the pool, request routing, experiments
  and recipes, pins, and the sync with the shared store; the serve config.
- `state/`: what replicas share and keep: the store contract and its backends, task and experiment tables,
  A/B outcomes.
- `merges/`: merge composition on the serving path: model names, the basis store, the composed-adapter cache.
- `engine/`: what runs in or around vLLM's engine: its launch, the CPU LoRA-op fix, the pin worker.
- `cluster/`: several API server processes of one vLLM: the group, directories owned by live processes.
- `errors.py`, `metrics.py`: the vocabulary every room uses (HTTP errors, Prometheus metrics).

Below all of it is the merge core (`knots_serve.adapters` … `compose`, `recipes`), which imports none of this.
"""
