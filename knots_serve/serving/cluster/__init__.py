"""Several API server processes of one vLLM: the group that keeps them in step (group.py) and directories
owned by live processes (owned_dirs.py). Imports only `errors.py`."""
