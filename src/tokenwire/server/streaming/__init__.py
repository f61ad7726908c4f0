"""The pieces every door streams through: an engine stream as a door's events (streams.py), Server-Sent Events
(sse.py), the OpenAI-style WebSockets' frame reader and sender (event_socket.py), flow control (flow.py) and a
socket's unread bytes (backlog.py), and the JSON a WebSocket door writes (wire.py)."""
