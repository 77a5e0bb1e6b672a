"""The Ray executor: a cell's draft and target actors in the cell's placement group, driven through
a Ray Compiled Graph, input -> draft.propose -> every target's verify -> output (or, with
`transport: actor_calls`, the same chain as plain actor calls that pass the draft's output by
reference). One execution carries a whole tick; with pipelining two executions are in flight, so
the draft proposes for one cohort while the targets verify the other.

If an actor dies, the executor replaces it in its bundle, recompiles and replays the ticks that
were in flight. The new actor holds no sequence, so it answers `resync` and the scheduler resends
those sequences' full token lists: their caches are rebuilt by prefill and the requests complete."""
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
    """[the cell's own process, the draft, each target in order]: the bundle indices actors use."""
    spec = cfg.cell(cell)
    return [{"CPU": max(spec.num_cpus, 0.01), **spec.resources}, bundle(cfg.draft)] + \
        [bundle(cfg.target(t)) for t in spec.targets]


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
        self.draft = self._start(DraftActor, 1, "draft", self.cfg.draft)
        self.targets = {n: self._start(TargetActor, 2 + i, f"target-{n}", self.cfg.target(n), n)
                        for i, n in enumerate(self.names)}
        self._wait_ready()
        self._compile()

    def _start(self, cls, index: int, role: str, spec: ModelSpec, *args):
        self.started += 1
        opts = {"num_cpus": spec.num_cpus, "num_gpus": spec.num_gpus,
                "name": f"{self.prefix}/{role}/{self.started}", "namespace": ACTOR_NAMESPACE}
        if self.pg is not None:
            opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=index)
        return cls.options(**opts).remote(self.config, 1 + len(self.names), *args)

    def _wait_ready(self):
        ray.get([a.ready.remote() for a in self.actors()], timeout=READY_TIMEOUT_S)
        vocabs = ray.get([a.vocab.remote() for a in self.actors()])
        check_vocab(vocabs[0], dict(zip(self.names, vocabs[1:])))

    def actors(self) -> list:
        return [self.draft, *self.targets.values()]

    def _compile(self):
        if not self.compiled:
            return
        with InputNode() as tick:
            drafted = self.draft.propose.bind(tick)
            dag = MultiOutputNode([self.targets[n].verify.bind(drafted) for n in self.names])
        self.graph = dag.experimental_compile(_max_inflight_executions=self.max_inflight)

    # -- the Executor interface ----------------------------------------------------------------
    def submit(self, tick: Tick) -> Ticket:
        ticket = Ticket(tick, None)
        self.pending.append(ticket)
        self._execute(ticket)
        return ticket

    def _execute(self, ticket: Ticket):
        try:
            if self.compiled:
                ticket.refs = self.graph.execute(ticket.tick)
            else:
                drafted = self.draft.propose.remote(ticket.tick)
                ticket.refs = [self.targets[n].verify.remote(drafted) for n in self.names]
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
        for role, actor in zip(["draft", *self.names], self.actors()):
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
        if isinstance(ticket.refs, Exception):
            raise ticket.refs
        if self.compiled:
            return [r.get(timeout=TICK_TIMEOUT_S) for r in ticket.refs]
        return ray.get(ticket.refs, timeout=TICK_TIMEOUT_S)

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
        try:
            if self.compiled:
                self.graph.teardown()
        except Exception as e:  # noqa: BLE001 - a graph with a dead actor may not tear down cleanly
            log.warning("teardown: %s", e)
        if not self._alive(self.draft):
            self.draft = self._start(DraftActor, 1, "draft", self.cfg.draft)
        for i, n in enumerate(self.names):
            if not self._alive(self.targets[n]):
                self.targets[n] = self._start(TargetActor, 2 + i, f"target-{n}", self.cfg.target(n), n)
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
