"""The reachability probe that runs before the data plane opens: it names what it could not reach."""

import socket

from cluster.reach import ReachProbe


def test_reach_and_refusal_are_told_apart():
    a, b = ReachProbe("127.0.0.1"), ReachProbe("127.0.0.1")
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    dead_port = closed.getsockname()[1]
    closed.close()                     # nothing listens there any more
    try:
        assert a.reach([("probe b", *b.address())], timeout_s=2) == []
        failures = a.reach([("probe b", *b.address()), ("node 127.0.0.1 (expert ranks 0)", "127.0.0.1", dead_port)], 2)
        assert failures == [f"node 127.0.0.1 (expert ranks 0) at 127.0.0.1:{dead_port}: Connection refused"]
    finally:
        a.close()
        b.close()
