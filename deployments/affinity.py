"""Send a sequence's calls to the replica that holds its KV cache (Ray Serve's RequestRouter hook).

A sequence's first call goes to the replica with the fewest sequences; later calls go back there
while it lives and has room, else anywhere (that replica rebuilds the cache by prefill)."""
from __future__ import annotations

from collections import Counter

from ray.serve.request_router import FIFOMixin, PendingRequest, ReplicaID, RequestRouter, RunningReplica


def sequence_of(request: PendingRequest | None) -> str | None:
    if request is None or not request.args:
        return None
    arg = request.args[0]
    return arg if isinstance(arg, str) else getattr(arg, "seq_id", None)


class SequenceAffinityRouter(FIFOMixin, RequestRouter):
    def initialize_state(self, **kwargs):
        self.home: dict[str, ReplicaID] = {}

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        seq = sequence_of(pending_request)
        home = self.home.get(seq)
        load = Counter(self.home.values())
        rest = sorted((r for r in candidate_replicas if r.replica_id != home), key=lambda r: load[r.replica_id])
        first = [r for r in candidate_replicas if r.replica_id == home]
        return [first, rest] if first else [rest]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        seq = sequence_of(pending_request)
        if seq is None:
            return
        if isinstance(pending_request.args[0], str):  # release(seq_id): the sequence is gone
            self.home.pop(seq, None)
        else:
            self.home[seq] = replica_id

    def on_replica_actor_died(self, replica_id: ReplicaID):
        super().on_replica_actor_died(replica_id)
        self.home = {s: r for s, r in self.home.items() if r != replica_id}
