"""Who may come in, and how much: API keys, origins and a tenant's identity (auth.py), connection caps (capacity.py),
per-key limits (limits.py), and the HTTP guards before any route runs (http_guard.py)."""
