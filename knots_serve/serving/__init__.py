"""The vLLM plugin: per-request merges on vLLM's OpenAI server."""
