"""sockets.send's contract under cancellation, with a stand-in socket whose send future the test
completes or cancels at chosen moments (the races a real zmq socket only hits now and then).

The first test is the bug that kept `zmqinfer up` from exiting after SIGTERM, about 1 run in 10:
on Python 3.11 `asyncio.wait_for` returns the inner result, swallowing the task's cancellation,
when the inner future completes in the same loop iteration as the cancel. The gateway's pump
sent a Release at the moment its TaskGroup cancelled it, went back to waiting, and shutdown
waited for it forever.
"""

from __future__ import annotations

import asyncio

import pytest

from zmqinfer.protocol import sockets


class FakeSocket:
    def __init__(self) -> None:
        self.closed = False
        self.future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def send_multipart(self, frames: list, copy: bool = True) -> asyncio.Future[None]:
        return self.future


async def test_a_cancel_that_meets_a_completed_send_is_not_lost() -> None:
    sock = FakeSocket()
    task = asyncio.create_task(sockets.send(sock, [b"x"], 5.0))  # type: ignore[arg-type]
    await asyncio.sleep(0)  # the send is pending
    sock.future.set_result(None)  # the send completes ...
    task.cancel()  # ... in the same iteration as the owner's cancel
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_send_that_never_completes_times_out() -> None:
    sock = FakeSocket()
    with pytest.raises(TimeoutError):
        await sockets.send(sock, [b"x"], 0.05)  # type: ignore[arg-type]
    assert sock.future.cancelled()


async def test_a_socket_closed_under_a_pending_send_returns_false() -> None:
    sock = FakeSocket()
    task = asyncio.create_task(sockets.send(sock, [b"x"], 5.0))  # type: ignore[arg-type]
    await asyncio.sleep(0)
    sock.closed = True  # a re-plan closed it: pyzmq cancels its pending futures
    sock.future.cancel()
    assert await task is False


async def test_a_completed_send_returns_true() -> None:
    sock = FakeSocket()
    sock.future.set_result(None)
    assert await sockets.send(sock, [b"x"], 5.0) is True  # type: ignore[arg-type]
