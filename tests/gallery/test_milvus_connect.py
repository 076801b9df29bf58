"""A Milvus server that accepts the connection and never answers: opening the gallery fails on one
line within the stated wait, instead of hanging."""

import socket
import threading
import time

import pytest

pytest.importorskip("pymilvus")

from bctkit.gallery.checks import GalleryError  # noqa: E402
from bctkit.gallery.interface import open_gallery  # noqa: E402


def test_a_silent_server_is_refused_within_the_wait():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    held = []
    threading.Thread(target=lambda: [held.append(srv.accept()) for _ in range(16)], daemon=True).start()
    port = srv.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(GalleryError) as err:
        open_gallery(f"milvus://127.0.0.1:{port}/g", timeout_s=2.0)
    took = time.monotonic() - t0
    srv.close()
    msg = str(err.value)
    assert "\n" not in msg and f"http://127.0.0.1:{port}" in msg and "waiting at most 2 s" in msg
    assert 1.5 < took < 8.0, took  # it waited for the server, and not much longer than it was told
