"""``cotrt serve --tp N`` under torchrun: rank 0 serves HTTP, the other ranks follow.

    torchrun --nproc-per-node N -m cotrt serve --model PATH --tp N

Every rank joins the group (``init``, with ``--tp-timeout`` on every collective), loads the
model with ``tp_plan="auto"`` and wraps it. Rank 0 then runs the usual server over a
``Lockstep`` engine; the others run ``follow`` until rank 0 stops. When the group fails (a
rank died or stalled), rank 0 says so on stderr, stops serving (open streams end with an
error) and exits 1; a follower that loses rank 0 exits 1 with the same kind of line.
"""
from __future__ import annotations

import sys

from .group import TPGroup, TPGroupError
from .lockstep import Lockstep, follow, lockstep


def follow_serve(runtime, group: TPGroup) -> int:
    """A follower's whole life in ``cotrt serve``: 0 when rank 0 stopped, 1 on failure."""
    try:
        follow(runtime, group)
    except TPGroupError as e:
        print(f"cotrt serve (rank {group.rank}): {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:  # Ctrl-C reaches every rank of a terminal's torchrun
        return 0
    return 0


class Driver:
    """Rank 0 of ``cotrt serve --tp``: ``runtime.engine`` becomes a Lockstep; ``serve(server)``
    runs the uvicorn server, stops it when the group fails (one line on stderr), and
    releases the followers when it returns. Returns the exit status (1 after a failure)."""

    def __init__(self, runtime, group: TPGroup):
        self.server = None
        self.lock: Lockstep = lockstep(runtime, group, on_failure=self._failed)

    def _failed(self, err: TPGroupError) -> None:
        print(f"cotrt serve: {err}; shutting down", file=sys.stderr, flush=True)
        if self.server is not None:
            self.server.should_exit = True

    def close(self) -> None:
        """Release the followers (they exit 0); idempotent."""
        self.lock.close()

    def serve(self, server) -> int:
        self.server = server
        try:
            if self.lock.failed is None:
                server.run()
        finally:  # (uvicorn re-raises the signal that stopped it, after its shutdown)
            self.close()
        return 1 if self.lock.failed is not None else 0
