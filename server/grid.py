"""A Grid wrapper that meters every message crossing the SuperLink and polls replies promptly.

Flower 1.39's grid sleeps 3 s between reply pulls; this wrapper pulls with a short backoff
(``poll_min`` doubling up to ``poll_max``; federation.reply_poll_min/max, default 0.05 s to
0.25 s), which removes on average 1.5 s of idle wait from every message phase. A pull is one
small request to the SuperLink's ServerAppIo API (docs/performance.md measures its cost).
Every message sent and received is counted (bytes) and can be observed by ``taps``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects


def message_bytes(message: Message) -> int:
    """Bytes of the message's serialized objects: what crosses the wire for it."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())


Tap = Callable[[str, Message, int], None]


class MeteredGrid(Grid):
    """Delegates to ``inner``; counts bytes sent/received and calls each tap per message.

    Parameters
    ----------
    inner : Grid
        The Grid the ServerApp was given.
    taps : list of callables, optional
        Each is called as ``tap("sent" | "received", message, size_in_bytes)``.
    poll_min, poll_max : float (default: 0.05, 0.25)
        Seconds between reply pulls: the first wait, doubled after every empty pull up to
        ``poll_max``. ``poll_min = poll_max = 3`` is Flower's own schedule.
    max_in_flight : int (default: 0)
        At most this many messages of a phase await replies at once (0: no limit). On one
        machine it bounds how many ClientApp processes (each with torch loaded) live at once.
    """

    def __init__(
        self,
        inner: Grid,
        taps: list[Tap] | None = None,
        poll_min: float = 0.05,
        poll_max: float = 0.25,
        max_in_flight: int = 0,
    ) -> None:
        self.inner = inner
        self.taps = list(taps or [])
        self.poll_min = poll_min
        self.poll_max = poll_max
        self.max_in_flight = max_in_flight
        self.bytes_sent = 0
        self.bytes_received = 0
        self.destinations: dict[str, int] = {}  # message ID -> the node it was sent to

    # Delegation of the abstract API ------------------------------------------------------
    def set_run(self, run: object) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> object:
        return self.inner.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        for message in messages:
            size = message_bytes(message)
            self.bytes_sent += size
            for tap in self.taps:
                tap("sent", message, size)
        ids = list(self.inner.push_messages(messages))
        self.destinations.update(zip(ids, (m.metadata.dst_node_id for m in messages), strict=True))
        return ids

    def replier(self, reply: Message) -> int:
        """The node a reply answers for: an error the SuperLink makes up for a node that went
        away carries the SuperLink's own ID as its source, not the silo's."""
        return self.destinations.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self.inner.pull_messages(message_ids))
        for reply in replies:
            size = message_bytes(reply)
            self.bytes_received += size
            for tap in self.taps:
                tap("received", reply, size)
        return replies

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push, then pull until every reply arrived or ``timeout`` seconds passed. With
        ``max_in_flight`` > 0 at most that many messages await a reply at any time: the next
        ones are pushed as replies come in."""
        queue = list(messages)
        if not queue:
            return []
        deadline = None if timeout is None else time.monotonic() + timeout
        pending: set[str] = set()
        replies: list[Message] = []
        delay = self.poll_min
        while True:
            room = len(queue) if self.max_in_flight <= 0 else self.max_in_flight - len(pending)
            if room > 0 and queue:
                pending.update(self.push_messages(queue[:room]))
                del queue[:room]
                delay = self.poll_min
            pulled = list(self.pull_messages(pending))
            replies.extend(pulled)
            pending.difference_update(m.metadata.reply_to_message_id for m in pulled)
            if pulled and queue:
                continue  # room for more: push them before waiting
            if not pending and not queue:
                break
            if deadline is not None and time.monotonic() >= deadline:
                break
            time.sleep(
                delay if deadline is None else max(0.0, min(delay, deadline - time.monotonic()))
            )
            delay = min(delay * 2, self.poll_max)
        return replies
