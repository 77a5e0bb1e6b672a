"""The scheduler on a thread of its own, for asyncio servers (the Ray serving cell).

The thread is the only one that touches the scheduler, so a sequence's state has one owner:
requests and aborts reach it through an inbox, token deltas leave through each request's asyncio
queue. The frontend's work (chat templates, tokenization, detokenization, stop strings) runs in
`stream`, on the event loop, so the scheduler's thread spends its time on ticks; and the tokenizer
is used by one thread only. Ticks block on the executor, never the event loop. Every request has a deadline
(Request.deadline_s); `report`, when given, gets Scheduler.load() about once a second, on the
scheduler's thread (a metrics exporter's gauges), and `load` keeps the last one (autoscaling)."""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable

import torch

from s2d.core.engine_core import EngineCore
from s2d.core.output import Delta
from s2d.core.request import DeadlineExceeded, Request, RequestFailed

log = logging.getLogger(__name__)


class EngineLoop:
    REPORT_EVERY_S = 1.0

    def __init__(self, core: EngineCore, torch_threads: int | None = None,
                 report: Callable[[dict], None] | None = None):
        self.core, self.scheduler = core, core.scheduler
        self.torch_threads, self.report = torch_threads, report
        self._reported = 0.0
        self.load: dict | None = None  # the scheduler's last load(), about once a second: read from any thread
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.outputs: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stop = False
        self.thread = threading.Thread(target=self._run, name="s2d-scheduler", daemon=True)
        self.thread.start()

    async def stream(self, req: Request, resume: list[int] = (), final_only: bool = False) -> AsyncIterator[Delta]:
        """Deltas of one request until it finishes; the deltas that queued while the consumer was
        busy come as one, and with `final_only` the whole output comes as one delta at the end.
        Bad input raises RequestError before the first delta, a failure of the engine on this
        request alone raises RequestFailed, its deadline passing DeadlineExceeded; leaving early
        (cancellation, a client gone, the deadline) aborts the request and frees its caches."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        prepared = self.scheduler.frontend.prepare(req)
        admitted: asyncio.Future = loop.create_future()
        out: asyncio.Queue = asyncio.Queue()
        self.inbox.put(("add", prepared, list(resume), loop, admitted, out))
        try:
            seq_id = await asyncio.shield(admitted)
        except asyncio.CancelledError:  # gone before admission: abort once admitted
            admitted.add_done_callback(lambda f: f.exception() or self.inbox.put(("abort", f.result())))
            raise
        output = self.scheduler.frontend.output(seq_id, prepared, resume)
        timeout = req.deadline_s(self.scheduler.limits)  # the frontend has checked the request
        # the deadline arrives as an item of the request's queue: no timer per delta
        timer = loop.call_at(started + timeout, out.put_nowait,
                             DeadlineExceeded(f"the request ran past its deadline of {timeout:g} s"))
        try:
            pending = None
            while True:
                item = await out.get()
                while True:
                    if isinstance(item, Exception):
                        raise item
                    if item.error:
                        raise RequestFailed(f"the engine failed on request {item.seq_id}: {item.error}")
                    d = output.add(item)
                    if d is not None:
                        pending = d if pending is None else pending.then(d)
                    if output.finished or out.empty():
                        break
                    item = out.get_nowait()
                if output.finished:  # at EOS or length, or a stop string (the finally aborts the sequence)
                    yield pending
                    return
                if pending is not None and not final_only:
                    yield pending
                    pending = None
        finally:
            timer.cancel()
            self.inbox.put(("abort", seq_id))

    def shutdown(self):
        self._stop = True
        self.inbox.put(("wake",))
        self.thread.join(timeout=10)

    # -- the scheduler thread ------------------------------------------------------------------
    def _take_inbox(self, block: bool):
        while True:
            try:
                msg = self.inbox.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                return
            block = False
            if msg[0] == "add":
                _, prepared, resume, loop, admitted, out = msg
                try:
                    seq = self.scheduler.add(prepared, resume)
                except Exception as e:  # noqa: BLE001 - the caller gets it
                    loop.call_soon_threadsafe(_set, admitted, None, e)
                    continue
                self.outputs[seq.seq_id] = (loop, out)
                loop.call_soon_threadsafe(_set, admitted, seq.seq_id, None)
            elif msg[0] == "abort":
                self.outputs.pop(msg[1], None)
                self.scheduler.abort(msg[1])

    def _run(self):
        if self.torch_threads:  # a new thread starts from OMP_NUM_THREADS, which Ray sets to 1
            torch.set_num_threads(self.torch_threads)
        while not self._stop:
            self._take_inbox(block=not self.scheduler.has_work)
            self._report()
            if not self.scheduler.has_work:
                continue
            try:
                deltas = self.core.step()
            except Exception as e:  # noqa: BLE001 - fail the live requests, keep serving
                log.exception("scheduler step failed")
                self._fail_running(e)
                continue
            for d in deltas:
                self._send(d.seq_id, d)
                if d.finished:
                    self.outputs.pop(d.seq_id, None)

    def _report(self):
        if time.monotonic() - self._reported >= self.REPORT_EVERY_S:
            self._reported = time.monotonic()
            try:
                self.load = self.scheduler.load()
                if self.report:
                    self.report(self.load)
            except Exception:  # noqa: BLE001 - metrics must never stop the engine
                log.exception("reporting the scheduler's load failed")

    def _fail_running(self, e: Exception):
        for seq_id in list(self.scheduler.running) + [s.seq_id for s in self.scheduler.waiting]:
            self._send(seq_id, RequestFailed(f"the engine failed: {type(e).__name__}: {e}"))
            self.outputs.pop(seq_id, None)
            self.scheduler.abort(seq_id)
        self.core.drop_inflight()

    def _send(self, seq_id: str, item):
        if seq_id in self.outputs:
            loop, out = self.outputs[seq_id]
            try:
                loop.call_soon_threadsafe(out.put_nowait, item)
            except RuntimeError:  # its event loop has closed: no one is listening
                self.outputs.pop(seq_id, None)


def _set(fut: asyncio.Future, value, exc):
    if not fut.done():
        fut.set_exception(exc) if exc else fut.set_result(value)
