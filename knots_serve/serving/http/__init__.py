"""The HTTP edge: FastAPI admin routes and /v1/models (api.py), the ASGI middleware that routes completion
requests to merges (middleware.py), API and admin key checks (auth.py), per-arm response labels
(arm_labels.py). May import `server/` and everything below it; nothing below imports this."""
