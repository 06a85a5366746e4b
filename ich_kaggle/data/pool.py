"""The one process-pool driver of the data stages' per-file work: the meta scan's headers, the cache's pixels.

Files go in chunks to a pool of worker processes (in-process below a size where starting a pool costs more than it
saves); each chunk's result is handed to `collect` in the order of the chunks, under a tqdm bar over the files. One
crash policy for every stage, so that one bad file never sinks a run of 874k:

- a file the work cannot read is the work's to skip, with its reason, inside the chunk;
- a worker process that dies (a segfault in a decoder, the out-of-memory killer) breaks the pool: the chunks then in
  flight (at most 2 per worker) are rerun file by file on a one-worker pool, so that when it dies again the file in
  flight is the culprit; it gets `crashed(item)`'s result (skipped, reason `WORKER_DIED`) and a fresh pool takes the
  rest;
- an exception the work raises (a `UserError`: the disk cannot be read) stops the run.
"""

from __future__ import annotations

import multiprocessing as mp
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from tqdm import tqdm

Item = TypeVar("Item")
Result = TypeVar("Result")

WORKER_DIED = "the worker process died reading this file (a crash or the out-of-memory killer); the rest went on"
# forkserver: safe even when the caller already runs threads (torch, tqdm monitor); a test may choose fork, whose
# workers inherit what it patched
START_METHOD = "forkserver"
BUFFERED = 8  # chunks per worker in flight or finished and waiting for an earlier one


def run(
    work: Callable[[list[Item]], Result],
    items: Sequence[Item],
    *,
    chunk: int,
    workers: int,
    in_process_below: int,
    collect: Callable[[Result], bool | None],
    crashed: Callable[[Item], Result],
    desc: str,
) -> None:
    """`work` (a module-level function, or a functools.partial of one, so workers can import it) on every chunk of
    `chunk` items; `collect` gets each result in chunk order and returns True to stop the run (the chunks still in
    flight finish, their results unused). `crashed(item)`: the result for an item whose worker process died."""
    chunks = [list(items[i : i + chunk]) for i in range(0, len(items), chunk)]
    with tqdm(total=len(items), desc=desc, unit="img", mininterval=1.0) as bar:

        def take(result: Result, n: int) -> bool:
            stop = bool(collect(result))
            bar.update(n)
            return stop

        if workers == 1 or len(items) < in_process_below:
            for c in chunks:
                if take(work(c), len(c)):
                    return
        else:
            _pooled(work, chunks, min(workers, len(chunks)), take, crashed)


def _pool(workers: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context(START_METHOD))


Take = Callable[[Any, int], bool]


def _pooled(work: Callable, chunks: list[list], workers: int, take: Take, crashed: Callable) -> None:
    """The chunks on pools of `workers`, a fresh pool after each break, a bounded number in flight (a break strands
    few)."""
    pending = deque(chunks)
    while pending:
        in_flight: deque[tuple[Future, list]] = deque()
        ex = _pool(workers)
        try:
            if _drain(ex, work, pending, in_flight, workers, take):
                return
        finally:
            ex.shutdown(wait=True, cancel_futures=True)
        if in_flight and _rescue(work, in_flight, take, crashed):  # the pool broke
            return


def _drain(ex, work: Callable, pending: deque, in_flight: deque, workers: int, take: Take) -> bool:
    """Keep 2 chunks per worker running and hand on the results in chunk order (a finished chunk waits for those
    before it, at most `BUFFERED` per worker) until the chunks run out (False), `collect` stops the run (True) or
    the pool breaks (False, the chunks in flight left in `in_flight`)."""
    while pending or in_flight:
        running = [f for f, _ in in_flight if not f.done()]
        try:
            while pending and len(running) < 2 * workers and len(in_flight) < BUFFERED * workers:
                future = ex.submit(work, pending[0])
                in_flight.append((future, pending.popleft()))
                running.append(future)
        except BrokenProcessPool:
            return False
        wait(running or [in_flight[0][0]], return_when=FIRST_COMPLETED)
        while in_flight and in_flight[0][0].done():
            future, chunk = in_flight[0]
            try:
                result = future.result()
            except BrokenProcessPool:
                return False
            in_flight.popleft()
            if take(result, len(chunk)):
                return True
    return False


def _rescue(work: Callable, stranded: deque, take: Take, crashed: Callable) -> bool:
    """The chunks in flight when the pool broke, in order: a finished one's result as it is, the others rerun file by
    file (`_isolated`); True when `collect` stopped the run."""
    rerun: list[list] = []
    for future, chunk in stranded:
        if future.cancelled() or isinstance(future.exception(), BrokenProcessPool):
            rerun.append(chunk)
            continue
        if rerun and _isolated(work, rerun, take, crashed):
            return True
        rerun = []
        if take(future.result(), len(chunk)):  # raises what the work raised
            return True
    return bool(rerun) and _isolated(work, rerun, take, crashed)


def _isolated(work: Callable, chunks: list[list], take: Take, crashed: Callable) -> bool:
    """The items of `chunks` one at a time on a one-worker pool: when it dies, the item in flight is the culprit and
    gets `crashed(item)`; a fresh pool takes the rest. True when `collect` stopped the run."""
    todo = deque(item for chunk in chunks for item in chunk)
    while todo:
        with _pool(1) as ex:
            try:
                while todo:
                    result = ex.submit(work, [todo[0]]).result()
                    todo.popleft()
                    if take(result, 1):
                        return True
            except BrokenProcessPool:
                if take(crashed(todo.popleft()), 1):
                    return True
    return False
