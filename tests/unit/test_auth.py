"""API keys and origins, decided without sockets."""

from __future__ import annotations

from tokenwire.server.admission.auth import AuthPolicy, Origin, bearer_token, origin_allowed, websocket_key

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


def test_an_origin_is_compared_by_scheme_host_and_port_never_by_its_text() -> None:
    """User info, paths or a bad port make it no origin at all: "http://evil.example@localhost" once passed as a
    local page. The server's own origin is matched on host and port, localhost and 127.0.0.1 being one host."""
    policy = AuthPolicy()
    for forged in (
        "http://evil.example@localhost",
        "http://localhost@evil.example",
        "http://evil.example/x",
        "http://evil.example:99999",
        "evil.example",
        "http://",
        "http://evil.example?localhost",
    ):
        assert Origin.parse(forged) is None or not Origin.parse(forged).is_local, forged  # type: ignore[union-attr]
        assert not origin_allowed(forged, "example.com:8765", policy), forged
    assert Origin.parse("http://LOCALHOST:8765") == Origin.parse("http://127.0.0.1:8765")
    assert Origin.parse("http://[::1]:8765") == Origin.parse("http://localhost:8765")
    assert Origin.parse("https://example.com") == Origin("https", "example.com", 443)
    assert not origin_allowed("https://example.com:9999", "example.com:8765", policy)  # another port: another site
    assert origin_allowed("https://example.com", "example.com", policy)  # default port on both sides
    listed = AuthPolicy(allowed_origins=("https://app.example/",))  # a trailing slash in the setting is fine
    assert origin_allowed("https://app.example", "x:1", listed)
    assert not origin_allowed("http://app.example", "x:1", listed)  # the scheme counts


def test_a_null_origin_is_allowed_for_websockets_unless_refused_and_is_foreign_over_http() -> None:
    """The tutorial's page, opened from a file, sends Origin null: it keeps working by default. An HTTP request
    from null is foreign (no API client sends it; sandboxed frames do)."""
    assert origin_allowed("null", "example.com:8765", AuthPolicy())
    assert not origin_allowed("null", "example.com:8765", AuthPolicy(null_origin=False))
    assert not origin_allowed("null", "example.com:8765", AuthPolicy(), http=True)
    assert origin_allowed("http://localhost:3000", "example.com:8765", AuthPolicy(), http=True)
