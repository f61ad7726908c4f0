"""Who gets the next free row: fair admission across API keys, then across their connections.

Requests that wait for a row wait here, in the engine core, not in a backend's own FIFO: one client's long queue
must not hold up another client's single request. Waiting requests are grouped by *tenant* (the API key, or one
tenant for all when the server has no keys), and within a tenant by *connection*; the next request is taken round
robin over tenants, then round robin over that tenant's connections, and first in, first out within a connection.
So with two rows busy, a second connection's request starts at the next free row however many the first
connection has queued. Generations that continue after a pause go first (:meth:`AdmissionQueue.push_front`):
they were admitted once already. Plain Python, no clock of its own: tested without an engine.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar


class Queued(Protocol):
    @property
    def request_id(self) -> str: ...

    @property
    def tenant(self) -> str: ...

    @property
    def connection(self) -> str: ...

    @property
    def queued_at(self) -> float: ...


T = TypeVar("T", bound=Queued)


@dataclass(slots=True)
class _Where:
    tenant: str
    connection: str


class AdmissionQueue(Generic[T]):
    """Waiting requests, taken round robin over tenants, then connections; FIFO within one connection."""

    def __init__(self) -> None:
        self._first: deque[T] = deque()  # continuing after a pause: ahead of everything
        self._tenants: OrderedDict[str, OrderedDict[str, deque[T]]] = OrderedDict()
        self._where: dict[str, _Where | None] = {}  # request id -> its place (None: in _first)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._where

    def __iter__(self) -> Iterator[T]:
        yield from self._first
        for connections in self._tenants.values():
            for items in connections.values():
                yield from items

    def push(self, item: T) -> None:
        """Queue ``item`` behind its connection's earlier requests."""
        if item.request_id in self._where:
            raise ValueError(f"request id {item.request_id!r} is already queued")
        connections = self._tenants.setdefault(item.tenant, OrderedDict())
        connections.setdefault(item.connection, deque()).append(item)
        self._where[item.request_id] = _Where(item.tenant, item.connection)

    def push_front(self, item: T) -> None:
        """Queue ``item`` ahead of every other: it ran before and continues."""
        if item.request_id in self._where:
            raise ValueError(f"request id {item.request_id!r} is already queued")
        self._first.append(item)
        self._where[item.request_id] = None

    def push_first(self, item: T) -> None:
        """Queue ``item`` at the very front, ahead of those continuing too (a suspect after a crash: recovery.py)."""
        if item.request_id in self._where:
            raise ValueError(f"request id {item.request_id!r} is already queued")
        self._first.appendleft(item)
        self._where[item.request_id] = None

    def peek(self) -> T | None:
        """What :meth:`pop` would return, left in place."""
        if self._first:
            return self._first[0]
        for connections in self._tenants.values():
            for items in connections.values():
                return items[0]
        return None

    def pop(self) -> T | None:
        """The next request to admit, or None when none waits."""
        if self._first:
            item = self._first.popleft()
            del self._where[item.request_id]
            return item
        if not self._tenants:
            return None
        tenant, connections = next(iter(self._tenants.items()))
        connection, items = next(iter(connections.items()))
        item = items.popleft()
        del self._where[item.request_id]
        # Round robin: this connection goes to the back of its tenant, the tenant to the back of all.
        del connections[connection]
        if items:
            connections[connection] = items
        del self._tenants[tenant]
        if connections:
            self._tenants[tenant] = connections
        return item

    def remove(self, request_id: str) -> T | None:
        """Take a waiting request out (aborted, paused); None if it does not wait here."""
        if request_id not in self._where:
            return None
        where = self._where.pop(request_id)
        if where is None:
            for item in self._first:
                if item.request_id == request_id:
                    self._first.remove(item)
                    return item
            raise AssertionError("unreachable: indexed but not queued")  # pragma: no cover
        connections = self._tenants[where.tenant]
        items = connections[where.connection]
        for item in items:
            if item.request_id == request_id:
                items.remove(item)
                break
        else:  # pragma: no cover
            raise AssertionError("unreachable: indexed but not queued")
        if not items:
            del connections[where.connection]
            if not connections:
                del self._tenants[where.tenant]
        return item

    def expired(self, before: float) -> list[T]:
        """Take out every request queued before ``before`` (not those continuing after a pause)."""
        gone: list[T] = []
        for connections in list(self._tenants.values()):
            for items in list(connections.values()):
                while items and items[0].queued_at < before:
                    gone.append(items[0])
                    self.remove(items[0].request_id)
        return gone
