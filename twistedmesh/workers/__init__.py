"""
Several worker processes behind one set of listeners (C{[mesh] workers = N}).

The parent process (L{Supervisor}) makes the listening sockets, runs the admin endpoint and any demo
upstreams, and starts N workers, each a L{twistedmesh.service.MeshService} on its own reactor that serves
the listeners. The parent restarts a worker that dies (with back-off) and speaks AMP with each one over a
socket pair for reload, drain and stats (L{protocol}); its admin C{/stats} is the sum of the workers'.

How the workers share a listener's port is C{[mesh] workers.sharing}: C{reuseport} (each worker binds its
own socket with C{SO_REUSEPORT} and the kernel spreads connections over them) or C{inherit} (the parent's
listening socket is inherited by every worker, which all accept from it). See docs/workers.md.
"""

from .supervisor import BackOff, Supervisor, WorkerSlot

__all__ = ["BackOff", "Supervisor", "WorkerSlot"]
