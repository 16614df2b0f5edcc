"""Helper threads that give way to the event loop.

The relay's loop thread answers SMTP clients and drives delivery; its helper threads (the
spool's group commit, the message log's SQLite writer, the thread pool) spend their time
blocked in fsync, a lock or disk reads. Waking from one, a normal thread may preempt the
loop's thread on its core (always so when smtp.pin_workers puts a worker and its threads
on one core), only to find the GIL held and sleep again: two context switches for
nothing, many per message under load. background() makes the calling thread SCHED_BATCH
on Linux: it is never woken ahead of the running thread, it runs when the loop waits or
its time slice ends, and batches grow a little under load instead. It keeps its nice
value and its full share of the CPU. Elsewhere, or where the call is refused, nothing
changes.
"""

from __future__ import annotations

import os


def background() -> None:
    """Make the calling thread a batch thread (see the module docstring)."""
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except (AttributeError, OSError):
        pass  # not Linux, or refused (a seccomp profile): scheduled as before


__all__ = ["background"]
