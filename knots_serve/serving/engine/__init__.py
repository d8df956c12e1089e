"""In or around vLLM's engine: how `knots-serve serve` starts vLLM (launch.py), the CPU LoRA-op fix
(lora_fix.py), and the worker extension that writes pinned merges into the weights (pinning.py). May import
`cluster/` and the merge core; never the server or the HTTP edge (it also runs in vLLM's workers)."""
