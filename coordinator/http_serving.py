"""What the coordinator's two HTTP servers (``/metrics`` and the dashboard) share."""

from __future__ import annotations

import threading
from socketserver import BaseServer


def stop_server(server: BaseServer | None, thread: threading.Thread | None) -> None:
    """Stop a server running ``serve_forever`` in ``thread``, close its socket and wait (5 s at
    most) for the thread; nothing to do for a server that never started."""
    if server is None:
        return
    server.shutdown()
    server.server_close()
    if thread is not None:
        thread.join(timeout=5)
