"""Ray Serve request-router plug-in for the engine deployment.

Routing itself is decided by the router actor (the ingress asks it and writes the chosen replica into
GenerateRequest.route). This plug-in makes Serve honour that choice while keeping Serve in charge of health,
backpressure and autoscaling: the chosen replica is ranked first and the others after it, so when the chosen one is
at max_ongoing_requests Serve moves on; with no choice (router down, prefix routing off) it is Serve's own
power-of-two rule. It also tells the router actor which replicas exist, so a dead replica leaves the index as soon
as Serve drops it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional

import ray
from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import PendingRequest, ReplicaID, RunningReplica

from actors.router import NAMESPACE, router_name

logger = logging.getLogger("ray.serve")


class PrefixRequestRouter(PowerOfTwoChoicesRequestRouter):
    _last_notify = 0.0
    _sender: ThreadPoolExecutor | None = None

    def _notify_router(self) -> None:
        self._last_notify = time.monotonic()
        replicas = [r.replica_id.unique_id for r in self._replicas.values()]
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._send(replicas)
        else:  # ray.get_actor blocks on the cluster's control store: never on Serve's routing loop. One thread,
            # so the lists arrive in the order Serve made them (an older one last would drop a new replica).
            if self._sender is None:
                self._sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvpool-replica-list")
            loop.run_in_executor(self._sender, self._send, replicas)

    def _send(self, replicas: list[str]) -> None:
        try:
            ray.get_actor(router_name(self.app_name), namespace=NAMESPACE).set_replicas.remote(replicas)
        except Exception:  # no router yet, or restarting: it learns the list at the next update
            logger.debug("router actor of app %s not reachable", self.app_name)

    def update_replicas(self, replicas: List[RunningReplica]):
        super().update_replicas(replicas)
        self._notify_router()

    def on_replica_actor_died(self, replica_id: ReplicaID):
        super().on_replica_actor_died(replica_id)
        self._notify_router()

    async def choose_replicas(
        self, candidate_replicas: List[RunningReplica], pending_request: Optional[PendingRequest] = None
    ) -> List[List[RunningReplica]]:
        wanted = None
        if pending_request is not None and pending_request.args:
            wanted = getattr(pending_request.args[0], "route", {}).get("replica")
        if wanted:
            first = [r for r in candidate_replicas if r.replica_id.unique_id == wanted]
            if first:
                return [first, [r for r in candidate_replicas if r is not first[0]]]
        elif time.monotonic() - self._last_notify > 1.0:
            # No choice came with the request: the router may have restarted without our replica list.
            self._notify_router()
        return await super().choose_replicas(candidate_replicas, pending_request)
