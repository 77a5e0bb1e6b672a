"""The Ray executor: a cell's draft and target actors in the cell's placement group, driven through
a Ray Compiled Graph, input -> draft.propose -> every target's verify -> output (or, with
`transport: actor_calls`, the same chain as plain actor calls that pass the draft's output by
reference). One execution carries a whole tick; with pipelining two executions are in flight, so
the draft proposes for one cohort while the targets verify the other.

A target with tensor_parallel N is N rank actors, each in a bundle of its own, which form the
target's group at start (s2d/worker/parallel.py). Every rank gets every tick; rank 0 gets the
sampled drafts' probabilities and alone returns.

If an actor dies, the executor replaces it in its bundle (a rank: every rank of its target, and
the group is formed again), recompiles and replays the ticks that were in flight. The new actor
holds no sequence, so it answers `resync` and the scheduler resends those sequences' full token
lists: their caches are rebuilt by prefill and the requests complete."""
from __future__ import annotations

import logging
import uuid
from collections import deque
from dataclasses import dataclass

import ray
from ray.dag import InputNode, MultiOutputNode
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from deployments.actors import DraftActor, TargetActor
from s2d.core.config import EngineConfig, ModelSpec
from s2d.core.engine import check_vocab
from s2d.core.executor import BusyClock, Tick, TickResult, Verified
from s2d.worker.model import load_hf_config
from s2d.worker.parallel import check_divides

log = logging.getLogger("ray.serve")
MAX_RECOVERIES = 3  # in a row, without a tick completing in between
READY_TIMEOUT_S = 600.0  # loading a large model takes minutes
ACTOR_NAMESPACE = "s2d"
LOST = (ray.exceptions.RayActorError, ray.exceptions.RayChannelError)  # an actor of the graph died
TICK_TIMEOUT_S = 600.0  # a tick is a few forwards; past this something hangs


def bundle(spec: ModelSpec) -> dict:
    """A model's bundle in its cell's placement group (a bundle needs some resource: 0.01 CPU at least)."""
    b = {"CPU": max(spec.num_cpus, 0.01)}
    if spec.num_gpus:
        b["GPU"] = spec.num_gpus
    return b


def cell_bundles(cfg: EngineConfig, cell: str) -> list[dict]:
    """[the cell's own process, the draft, each target's ranks in order]: the bundle indices actors use."""
    spec = cfg.cell(cell)
    return [{"CPU": max(spec.num_cpus, 0.01), **spec.resources}, bundle(cfg.draft)] + \
        [bundle(cfg.target(t)) for t in spec.targets for _ in range(cfg.target(t).tensor_parallel)]


@dataclass
class Ticket:
    tick: Tick
    refs: list | Exception  # one result ref per target, or why the tick could not be sent


class RayExecutor(BusyClock):
    def __init__(self, cfg: EngineConfig, cell: str, pipeline: bool, transport: str = "compiled_graph"):
        self.cfg, self.config = cfg, cfg.model_dump()
        self.compiled = transport == "compiled_graph"
        self.prefix = f"{cell}/{uuid.uuid4().hex[:8]}"  # actors: CELL/ID/ROLE/N in namespace s2d (operators, tests)
        self.started = 0
        self.names = cfg.cell(cell).targets
        super().__init__(self.names)
        self.max_inflight = 2 if pipeline else 1
        self.pg = ray.util.get_current_placement_group()  # None outside a cell (tests): no bundles
        self.pending: deque[Ticket] = deque()
        self.recoveries = 0
        for n in self.names:  # a split that does not divide the model fails here, before any actor starts
            t = cfg.target(n)
            check_divides(t.tensor_parallel, load_hf_config(cfg.resolve(t.path), t.trust_remote_code),
                          f"targets.{n}.tensor_parallel")
        sizes = [cfg.target(n).tensor_parallel for n in self.names]
        self.share = 1 + sum(sizes)  # model actors sharing the host's cores
        self.first_bundle = dict(zip(self.names, [2 + sum(sizes[:i]) for i in range(len(sizes))]))
        self.split = max(sizes) > 1  # some target's other ranks take the drafts without probabilities
        self.draft = self._start(DraftActor, 1, "draft", self.cfg.draft)
        self.ranks = {n: self._start_ranks(n) for n in self.names}  # each target's actors, rank 0 first
        self._wait_ready()
        self._compile()

    def _start(self, cls, index: int, role: str, spec: ModelSpec, *args):
        self.started += 1
        opts = {"num_cpus": spec.num_cpus, "num_gpus": spec.num_gpus,
                "name": f"{self.prefix}/{role}/{self.started}", "namespace": ACTOR_NAMESPACE}
        if self.pg is not None:
            opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=index)
        return cls.options(**opts).remote(self.config, self.share, *args)

    def _start_ranks(self, name: str) -> list:
        spec = self.cfg.target(name)
        return [self._start(TargetActor, self.first_bundle[name] + r, f"target-{name}" + (f"-rank{r}" if r else ""),
                            spec, name, r) for r in range(spec.tensor_parallel)]

    def _wait_ready(self):
        ray.get([a.ready.remote() for a in self.actors()], timeout=READY_TIMEOUT_S)
        vocabs = ray.get([a.vocab.remote() for a in [self.draft, *self.leads()]])
        check_vocab(vocabs[0], dict(zip(self.names, vocabs[1:])))
        for ranks in self.ranks.values():
            if len(ranks) > 1 and not all(ray.get([a.in_group.remote() for a in ranks])):
                self._form_group(ranks)

    @staticmethod
    def _form_group(ranks: list):
        """A target's ranks join one group, at rank 0's rendezvous, through shared memory where
        they share a node."""
        rendezvous = ray.get(ranks[0].listen.remote())
        same_node = len(set(ray.get([a.node.remote() for a in ranks]))) == 1
        ray.get([a.join.remote(rendezvous, same_node) for a in ranks], timeout=READY_TIMEOUT_S)

    def actors(self) -> list:
        return [self.draft, *(a for ranks in self.ranks.values() for a in ranks)]

    def leads(self) -> list:
        """Each target's rank 0: the actor that samples and returns its verification."""
        return [self.ranks[n][0] for n in self.names]

    def _bind(self, tick) -> list:
        """The tick's verifications, every rank of every target, by target in order (a Ray DAG's
        nodes, or refs of plain actor calls)."""
        method = "bind" if self.compiled else "remote"
        if self.split:
            drafted, bare = getattr(self.draft.propose_for_ranks.options(num_returns=2), method)(tick)
        else:
            drafted = bare = getattr(self.draft.propose, method)(tick)
        return [getattr(a.verify, method)(drafted if r == 0 else bare)
                for n in self.names for r, a in enumerate(self.ranks[n])]

    def _compile(self):
        if not self.compiled:
            return
        with InputNode() as tick:
            dag = MultiOutputNode(self._bind(tick))
        self.graph = dag.experimental_compile(_max_inflight_executions=self.max_inflight)

    # -- the Executor interface ----------------------------------------------------------------
    def submit(self, tick: Tick) -> Ticket:
        ticket = Ticket(tick, None)
        self.pending.append(ticket)
        self._execute(ticket)
        return ticket

    def _execute(self, ticket: Ticket):
        try:
            ticket.refs = self.graph.execute(ticket.tick) if self.compiled else self._bind(ticket.tick)
        except LOST as e:  # the graph was torn down by an actor's death: result() recovers
            ticket.refs = e

    def result(self, ticket: Ticket) -> TickResult:
        while True:
            try:
                out = self._collect(ticket)
                break
            except LOST as e:
                self._recover(e)
            except Exception:  # a failed tick (a bug, bad input): its ticket is spent
                self.pending.popleft()
                raise
        assert self.pending.popleft() is ticket, "results are taken in submission order"
        self.recoveries = 0
        result = TickResult.of(out)
        self.count(result)
        return result

    def stats(self) -> dict:
        out = {"busy_fraction": self.fractions()}
        for role, actor in zip(["draft", *self.names], [self.draft, *self.leads()]):
            try:
                out[role] = ray.get(actor.stats.remote(), timeout=10)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
                out[role] = {"unavailable": type(e).__name__}  # dead or being replaced
        return out

    def drain(self):
        """Drop the ticks in flight after a failed one: take and discard their results, so the
        graph's buffers are free for the next ticks."""
        while self.pending:
            ticket = self.pending.popleft()
            try:
                self._collect(ticket)
            except Exception:  # noqa: BLE001 - discarded either way
                pass

    def _collect(self, ticket: Ticket) -> list[Verified]:
        """Every rank's result (a compiled graph's buffers are freed by reading them), rank 0's kept."""
        if isinstance(ticket.refs, Exception):
            raise ticket.refs
        if self.compiled:
            out = [r.get(timeout=TICK_TIMEOUT_S) for r in ticket.refs]
        else:
            out = ray.get(ticket.refs, timeout=TICK_TIMEOUT_S)
        return [v for v in out if v is not None]

    def shutdown(self):
        try:
            if self.compiled:
                self.graph.teardown()
        finally:
            for a in self.actors():
                ray.kill(a)

    # -- faults --------------------------------------------------------------------------------
    def _recover(self, error: Exception):
        """Replace dead actors, recompile, replay the ticks in flight."""
        self.recoveries += 1
        if self.recoveries > MAX_RECOVERIES:
            raise RuntimeError(f"the cell's actors keep failing: {error}") from error
        log.warning("cell actor lost (%s); replacing it and recompiling", type(error).__name__)
        # a target's group dies with any of its ranks: the others (waiting in a collective) go too,
        # before the teardown waits on them
        lost = [n for n in self.names if not all([self._alive(a) for a in self.ranks[n]])]
        for n in lost:
            for a in self.ranks[n]:
                ray.kill(a)
        try:
            if self.compiled:
                self.graph.teardown()
        except Exception as e:  # noqa: BLE001 - a graph with a dead actor may not tear down cleanly
            log.warning("teardown: %s", e)
        if not self._alive(self.draft):
            self.draft = self._start(DraftActor, 1, "draft", self.cfg.draft)
        for n in lost:
            self.ranks[n] = self._start_ranks(n)
        self._wait_ready()
        self._compile()
        for ticket in self.pending:
            self._execute(ticket)

    @staticmethod
    def _alive(actor) -> bool:
        try:
            return ray.get(actor.ready.remote(), timeout=5)
        except Exception:  # noqa: BLE001 - dead, dying or hung: replace it
            ray.kill(actor)
            return False
