"""Cost of the multiplexer per 16 KiB chunk, both sides, no WebSocket framing.

One iteration: send_data -> next_record -> receive_record -> DataReceived ->
acknowledge (which sometimes queues a WINDOW that flows back).  Records are
pulled with a write size, as the tunnel's writer pulls them (the scheduler's
full path), and joined into one record (the copy the WebSocket framing makes
in the tunnel).  Run as a script to print the figure; ``measure()`` returns
it in microseconds.
"""

from __future__ import annotations

import time

from wstunnel.mux import Role, Session
from wstunnel.protocol import DEFAULT_WRITE_SIZE

CHUNK_SIZE = 16 * 1024


def _connected() -> tuple[Session, Session, int]:
    sender, receiver = Session(Role.AGENT), Session(Role.RELAY)
    for _ in range(2):
        for a, b in ((sender, receiver), (receiver, sender)):
            while (record := a.next_record()) is not None:
                b.receive_record(record)
    channel_id = sender.open_channel("bench.invalid", 9)
    while (record := sender.next_record()) is not None:
        receiver.receive_record(record)
    receiver.accept_channel(channel_id)
    while (record := receiver.next_record()) is not None:
        sender.receive_record(record)
    sender.events_received()
    receiver.events_received()
    return sender, receiver, channel_id


def _run(chunks: int) -> float:
    sender, receiver, channel_id = _connected()
    payload = bytes(CHUNK_SIZE)
    send_data, next_record = sender.send_data, sender.next_record
    receive, events, acknowledge = receiver.receive_record, receiver.events_received, \
        receiver.acknowledge
    back_next, back_receive = receiver.next_record, sender.receive_record
    start = time.perf_counter()
    for i in range(chunks):
        send_data(channel_id, payload)
        receive(next_record(DEFAULT_WRITE_SIZE))  # type: ignore[arg-type]  # never None here
        for event in events():
            acknowledge(channel_id, len(event.data))  # type: ignore[union-attr]
        back = back_next()
        if back is not None:  # a WINDOW, once per quarter window
            back_receive(back)
        if not i & 1023:
            sender.events_received()
    elapsed = time.perf_counter() - start
    assert receiver.events_received() == [] and receiver.buffered_size == 0
    return elapsed / chunks * 1e6


def _run_sides(chunks: int) -> tuple[float, float]:
    """(sender, receiver) microseconds per chunk, each side timed on its own.

    In the tunnel each side runs in its own process (agent, relay), so this
    is what one process pays per chunk it sends or receives.
    """
    sender, receiver, channel_id = _connected()
    payload = bytes(CHUNK_SIZE)
    window = receiver.initial_window
    batch = window // CHUNK_SIZE
    send_time = receive_time = 0.0
    done = 0
    while done < chunks:
        start = time.perf_counter()
        records = []
        for _ in range(batch):
            sender.send_data(channel_id, payload)
            records.append(sender.next_record(DEFAULT_WRITE_SIZE))
        middle = time.perf_counter()
        for record in records:
            receiver.receive_record(record)  # type: ignore[arg-type]
            for event in receiver.events_received():
                receiver.acknowledge(channel_id, len(event.data))  # type: ignore[union-attr]
        end = time.perf_counter()
        while (back := receiver.next_record()) is not None:  # WINDOWs: untimed plumbing
            sender.receive_record(back)
        sender.events_received()
        send_time += middle - start
        receive_time += end - middle
        done += batch
    return send_time / done * 1e6, receive_time / done * 1e6


def measure(chunks: int = 20000) -> float:
    """Return the best-of-three cost in microseconds per 16 KiB chunk, both sides."""
    return min(_run(chunks) for _ in range(3))


def measure_sides(chunks: int = 20000) -> tuple[float, float]:
    """Best-of-three (sender, receiver) cost in microseconds per 16 KiB chunk."""
    runs = [_run_sides(chunks) for _ in range(3)]
    return min(r[0] for r in runs), min(r[1] for r in runs)


if __name__ == "__main__":
    print(f"mux: {measure():.2f} us per 16 KiB chunk (send+receive, both sides)")
    sent, received = measure_sides()
    print(f"mux: {sent:.2f} us to send, {received:.2f} us to receive a chunk "
          "(each side on its own: what one process pays)")
