"""splice (net/splice.py) when the channel is refused with GOING_AWAY: nothing read
from the local side is lost, so the agent can send it all on the next session."""

from __future__ import annotations

import trio

from wstunnel import mux
from wstunnel.net.channel_stream import ChannelStream
from wstunnel.net.channel_table import end_channel
from wstunnel.net.splice import splice


class _Host:
    """A ChannelHost with room for anything; it records the DATA given."""

    name = "fake"
    role = mux.Role.AGENT

    def __init__(self) -> None:
        self.given = bytearray()

    def send_capacity(self, channel: ChannelStream) -> int:
        return 1 << 20

    def send_data(self, channel: ChannelStream, data: bytes) -> None:
        self.given += data

    def send_eof(self, channel: ChannelStream) -> None: ...

    def reset(self, channel: ChannelStream, code: mux.ResetCode, text: str, *,
              after_data: bool = False) -> bool:
        raise AssertionError("a channel refused with GOING_AWAY is not reset")

    def acknowledge(self, channel: ChannelStream, size: int) -> None: ...
    def wake_writer(self) -> None: ...
    def dispatch_local_events(self) -> None: ...


class _RefusedWhileReading(trio.abc.HalfCloseableStream):
    """A local connection that sends ``first``, then ``second``; the relay's refusal
    (GOING_AWAY, handing back what the channel was given) is dispatched while the
    second read is on its way back to splice, as the session's reader may run then."""

    def __init__(self, host: _Host, channel: ChannelStream) -> None:
        self._host = host
        self._channel = channel
        self._reads = [b"first ", b"second"]

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.sleep(0)
        if not self._reads:
            await trio.sleep_forever()
        data = self._reads.pop(0)
        if not self._reads:
            refusal = mux.ChannelOpenFailed(self._channel.channel_id, mux.OpenFailure.GOING_AWAY,
                                            "GOING_AWAY", retry_data=bytes(self._host.given))
            end_channel("fake", None, self._channel, refusal)
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        raise AssertionError("nothing comes back before OPEN_OK")

    async def wait_send_all_might_not_block(self) -> None: ...
    async def send_eof(self) -> None: ...
    async def aclose(self) -> None: ...


async def test_bytes_read_as_the_channel_is_refused_are_kept_for_the_retry() -> None:
    """The local side's bytes read just when the refusal arrives (too late to give to
    the channel) join what the mux handed back, in order: ``retry`` holds every
    byte read, and splice ends without resetting anything."""
    host = _Host()
    channel = ChannelStream(host, 1, "db", 5432)
    with trio.fail_after(5):
        clean = await splice(_RefusedWhileReading(host, channel), channel)
    assert not clean
    assert host.given == b"first "
    assert channel.retry is not None
    assert bytes(channel.retry.data) == b"first second"
