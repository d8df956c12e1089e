"""Who may do what (docs/SECURITY.md), checked by the middleware before anything is parsed or routed.

- The admin key (the env var named by `admin_key_env`): /admin/*, and vLLM's routes that change the
  engine: the runtime LoRA routes, which knots-serve must switch on for its resolver
  (VLLM_ALLOW_RUNTIME_LORA_UPDATING) but which would let any client load an adapter from any path the
  server can read or unload the task adapters, their SageMaker aliases, elastic scaling, and the dev routes.
- The API key, when one is set (VLLM_API_KEY or --api-key, vLLM's own): every other route but the public
  probes. vLLM checks it only on /v1/*, /v2/*, /inference, /cohere, which leaves /invocations (SageMaker
  inference), /tokenize, /generative_scoring, ... open; here it is deny by default.
"""

from __future__ import annotations

import hashlib
import hmac
import os

ADMIN_PATHS = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/scale_elastic_ep", "/reset_prefix_cache",
               "/reset_mm_cache", "/sleep", "/wake_up", "/collective_rpc")
ADMIN_PREFIXES = ("/admin/", "/adapters")
PUBLIC = ("/health", "/ping", "/version", "/metrics", "/openapi.json", "/docs", "/redoc")


def digest(key: str) -> bytes:
    """Keys are compared as SHA-256 digests in constant time: no timing leak of content or length."""
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def _bearer(authorization: str | None) -> str:
    scheme, _, token = (authorization or "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def admin_refusal(key_env: str, authorization: str | None, x_admin_key: str | None) -> tuple[int, str] | None:
    """None when the request carries the admin key (X-Admin-Key, or Authorization: Bearer KEY), else
    (HTTP status, message)."""
    expected = os.environ.get(key_env)
    if not expected:
        return 403, f"admin API disabled: set {key_env} for the server"
    if not hmac.compare_digest(digest(x_admin_key or _bearer(authorization)), digest(expected)):
        return 401, "missing or wrong admin key (Authorization: Bearer KEY or X-Admin-Key: KEY)"
    return None


def refusal(method: str, path: str, headers: dict[bytes, bytes], key_env: str,
            api_keys: list[bytes]) -> tuple[int, str] | None:
    """Why a request may not pass (status, message), or None. `api_keys`: digests of the API keys."""
    def header(name):
        return headers[name].decode("latin-1") if name in headers else None
    if path in ADMIN_PATHS or path.startswith(ADMIN_PREFIXES):
        return admin_refusal(key_env, header(b"authorization"), header(b"x-admin-key"))
    if not api_keys or method == "OPTIONS" or path in PUBLIC or path.startswith("/docs"):
        return None
    given = digest(_bearer(header(b"authorization")))
    if not any([hmac.compare_digest(given, k) for k in api_keys]):  # a list: every key is compared
        return 401, "missing or wrong API key (Authorization: Bearer KEY)"
    return None
