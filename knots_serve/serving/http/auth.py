"""Who may do what (docs/SECURITY.md), checked by the middleware before anything is parsed or routed.

- The admin key (the env var named by `admin_key_env`): /admin/*, and vLLM's routes that change the
  engine: the runtime LoRA routes, which knots-serve must switch on for its resolver
  (VLLM_ALLOW_RUNTIME_LORA_UPDATING) but which would let any client load an adapter from any path the
  server can read or unload the task adapters, their SageMaker aliases, elastic scaling, and the dev, RL,
  profiler, fault-tolerance and abort routes that flags of vLLM mount (pause the engine, abort others'
  requests, replace or reset the weights, start a profiler).
- The API key, when one is set (VLLM_API_KEY or --api-key, vLLM's own): every other route but the public
  probes and the console's files (which hold no data). vLLM checks it only on /v1/*, /v2/*, /inference,
  /cohere, which leaves /invocations (SageMaker inference), /tokenize, /generative_scoring, ... open; here
  it is deny by default. The two keys stay apart: the admin key is no API key (the console asks for both).
"""

from __future__ import annotations

import hashlib
import hmac
import os

ADMIN_PATHS = (
    # runtime LoRA, elastic scaling, the dev routes (VLLM_SERVER_DEV_MODE)
    "/v1/load_lora_adapter",
    "/v1/unload_lora_adapter",
    "/scale_elastic_ep",
    "/reset_prefix_cache",
    "/reset_mm_cache",
    "/reset_encoder_cache",
    "/release_kv_cache_memory",
    "/sleep",
    "/wake_up",
    "/collective_rpc",
    "/server_info",
    # the RL routes (VLLM_SERVER_DEV_MODE): pause the engine, abort every request, replace the weights
    "/pause",
    "/resume",
    "/abort_requests",
    "/init_weight_transfer_engine",
    "/shutdown_weight_transfer_engine",
    "/start_weight_update",
    "/start_draft_weight_update",
    "/update_weights",
    "/finish_weight_update",
    "/update_weight_version",
    "/weight_checker",
    # abort anyone's requests by id (--enable-scale-out, --tokens-only); the profiler (--profiler-config)
    "/inference/v1/abort_requests",
    "/start_profile",
    "/stop_profile",
)
ADMIN_PREFIXES = ("/admin/", "/adapters", "/fault_tolerance/")  # --enable-fault-tolerance
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


def refusal(
    method: str, path: str, headers: dict[bytes, bytes], key_env: str, api_keys: list[bytes]
) -> tuple[int, str] | None:
    """Why a request may not pass (status, message), or None. `api_keys`: digests of the API keys."""

    def header(name):
        return headers[name].decode("latin-1") if name in headers else None

    if path in ADMIN_PATHS or path.startswith(ADMIN_PREFIXES):
        return admin_refusal(key_env, header(b"authorization"), header(b"x-admin-key"))
    if not api_keys or method == "OPTIONS" or path in PUBLIC or path.startswith(("/docs", "/console")):
        return None
    given = digest(_bearer(header(b"authorization")))
    if not any([hmac.compare_digest(given, k) for k in api_keys]):  # a list: every key is compared
        return 401, "missing or wrong API key (Authorization: Bearer KEY)"
    return None
