"""Server-wide settings: what the doors, the journal and the limits are run with."""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenwire.server.requests.params import Limits
from tokenwire.server.streaming.flow import FlowPolicy


@dataclass(slots=True, frozen=True)
class ServerSettings:
    """The server-wide settings every door and the resume machinery read (serve.py fills them from the command line)."""

    limits: Limits = field(default_factory=Limits)
    heartbeat_interval: float = 30.0  # seconds between server pings; 0 disables them
    slow_consumer_timeout: float = 30.0  # a send blocked this long closes the connection
    resume_window: float = 60.0  # seconds an orphaned or finished generation stays resumable; 0: no resume
    resume_buffer_bytes: int = 64 << 20  # messages kept for resume, all generations together
    max_connections: int = 0  # WebSockets and API requests held at once (0: no cap); see capacity.py
    flow: FlowPolicy = field(default_factory=FlowPolicy)  # how far a generation may run ahead of its reader
    max_connections_per_ip: int = 0  # WebSockets and API requests from one client address (0: no cap)
    max_generations_per_key: int = 0  # generations one API key runs at once over every door (0: no cap)
    rate_limit_tokens_per_minute: int = 0  # tokens (prompt and generated) one API key may use a minute (0: no cap)
    journal_url: str | None = None  # redis://...: a journal shared by replicas (resume/redis_journal.py); None: here
    journal_lease: float = 3.0  # seconds a replica's lease on its generations lasts unless renewed
    responses_store: int = 1000  # Responses API responses kept (previous_response_id, GET, background)
    responses_ttl: float = 3600.0  # seconds a finished response stays kept
