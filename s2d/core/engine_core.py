"""The engine core: schedule, execute, update, once a tick (as vLLM's EngineCore.step).

The scheduler plans ticks and takes their results back; the executor runs them, up to its
`max_inflight` at once (two where the draft and the targets work side by side). The engine core
holds the ticks in flight between the two, and times each tick from its start to the next's: the
caller's time between ticks (streaming the deltas, its own loop) is part of what a round costs, and
the draft policy weighs rounds by it."""
from __future__ import annotations

import time
from collections import deque

from s2d.core.executor import Executor
from s2d.core.scheduler import Planned, Scheduler
from s2d.core.sequence import TokenDelta


class EngineCore:
    def __init__(self, scheduler: Scheduler, executor: Executor):
        self.scheduler, self.executor = scheduler, executor
        self.inflight: deque[tuple[Planned, object]] = deque()  # (the plan, the executor's handle)
        self.t_end: float | None = None  # when the last tick returned, while sequences were running

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def step(self) -> list[TokenDelta]:
        """Submit a tick for every cohort with none in flight, then finish the oldest in flight and
        return what it added to each sequence."""
        t0 = time.perf_counter()
        between = t0 - self.t_end if self.t_end is not None else 0.0
        self.t_end = None
        for planned in self.scheduler.schedule():
            self.inflight.append((planned, self.executor.submit(planned.tick)))
        if not self.inflight:
            return []
        planned, handle = self.inflight.popleft()
        result = self.executor.result(handle)
        deltas = self.scheduler.update(planned, result)
        self.scheduler.account(planned, result, time.perf_counter() - t0 + between)
        if self.scheduler.running:  # a next tick follows at once; idle time before a new request is no one's cost
            self.t_end = time.perf_counter()
        return deltas

    def drop_inflight(self):
        """After a failed tick: forget the ticks in flight (the caller aborts their sequences)."""
        self.inflight.clear()
        self.scheduler.forget_planned()
        self.executor.drain()
