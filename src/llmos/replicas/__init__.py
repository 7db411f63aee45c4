"""Engine replicas on Ray: a pool shaped like one engine, a prefix-aware router, failover.

Importing this package does not import Ray; starting a `ReplicaPool` does.
"""

from llmos.replicas.backend import ReplicaBackend
from llmos.replicas.pool import ReplicaLostError, ReplicaPool
from llmos.replicas.router import POLICIES, NoReplicaError, ReplicaState, Router

__all__ = ["ReplicaPool", "ReplicaBackend", "ReplicaLostError", "Router", "ReplicaState", "NoReplicaError",
           "POLICIES"]
