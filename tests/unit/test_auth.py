"""API keys and origins, decided without sockets."""

from __future__ import annotations

from tokenwire.server.auth import AuthPolicy, bearer_token, origin_allowed, websocket_key

KEYS = AuthPolicy(api_keys=("s3cret", "other"))


def test_without_keys_everything_is_allowed() -> None:
    assert AuthPolicy().key_ok(None) and not AuthPolicy().enabled


def test_keys_are_checked() -> None:
    assert KEYS.enabled and KEYS.key_ok("s3cret") and KEYS.key_ok("other")
    assert not KEYS.key_ok(None) and not KEYS.key_ok("") and not KEYS.key_ok("s3cre") and not KEYS.key_ok("s3cret!")


def test_bearer_header() -> None:
    assert bearer_token({"authorization": "Bearer s3cret"}) == "s3cret"
    assert bearer_token({"authorization": "bearer  s3cret "}) == "s3cret"
    assert bearer_token({"authorization": "Basic abc"}) is None
    assert bearer_token({}) is None


def test_websocket_key_from_header_subprotocol_or_query() -> None:
    assert websocket_key({"authorization": "Bearer a"}, {}, []) == ("a", None)
    assert websocket_key({}, {}, ["chat", "bearer.b"]) == ("b", "bearer.b")
    assert websocket_key({}, {"api_key": "c"}, []) == ("c", None)
    assert websocket_key({}, {}, ["chat"]) == (None, None)


def test_origins() -> None:
    policy = AuthPolicy()
    assert origin_allowed(None, "example.com:8765", policy)  # not a browser
    assert origin_allowed("https://example.com:8765", "example.com:8765", policy)  # same origin
    assert origin_allowed("http://localhost:3000", "example.com:8765", policy)
    assert origin_allowed("http://127.0.0.1:9999", "example.com:8765", policy)
    assert origin_allowed("null", "example.com:8765", policy)  # a page opened from a file, like the tutorial's
    assert not origin_allowed("https://evil.example", "example.com:8765", policy)
    assert origin_allowed("https://app.example", "x:1", AuthPolicy(allowed_origins=("https://app.example",)))
    assert origin_allowed("https://evil.example", "x:1", AuthPolicy(allowed_origins=("*",)))
