"""What every evaluator's loop shares: its settings over the defaults, this process's share of
the examples, read a few ahead by threads and grouped into batches, and the sums and gathers
over processes that make every process's results the whole dataset's.

    settings = loop.with_overrides(default_config(), eval_config, "classification evaluator")
    examples = loop.read_ahead(load, loop.process_indices(len(dataset), settings.max_images))
    for batch in loop.batches(examples, size):       # [(index, load(index)), ...]
        ...
    totals = loop.Totals({"hits": np.zeros(2, np.int64)})
    totals.add({"hits": device_hits})                # fetched a few calls late
    totals.summed()                                  # exact int64 sums over processes
    rows = loop.gather_over_processes(rows, count)   # every process's rows, in dataset order

Process p takes the examples p, p + P, p + 2P, ... of the first `count` (P processes).
"""

import collections
import concurrent.futures
import itertools
import math
import time
from collections.abc import Callable, Iterable, Iterator

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from mixreorg_jax import progress


def with_overrides(
    defaults: ml_collections.ConfigDict, eval_config: ml_collections.ConfigDict, name: str
) -> ml_collections.ConfigDict:
    """`defaults` updated with `eval_config` (lists become tuples); a field `defaults` lacks or a
    value of the wrong type is a ValueError naming it (`name`: the evaluator, for the message)."""
    for key, value in eval_config.items():
        if key not in defaults:
            raise ValueError(f"{name}: unknown field {key!r}; known: {', '.join(sorted(defaults))}")
        try:
            defaults[key] = tuple(value) if isinstance(value, list) else value
        except TypeError as e:
            raise ValueError(f"{name}: field {key!r}: {e}") from None
    return defaults


def process_indices(size: int, max_images: int = 0) -> range:
    """This process's indices of the first `max_images` of `size` examples (0: all); the range's
    `stop` is the number of examples over all processes."""
    count = min(size, max_images or size)
    return range(jax.process_index(), count, jax.process_count())


def read_ahead(
    load: Callable[[int], object], indices: Iterable[int], depth: int = 8
) -> Iterator[tuple[int, object]]:
    """(index, load(index)) in order, loaded by threads up to `depth` examples ahead."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        pending = collections.deque()
        for index in indices:
            pending.append((index, pool.submit(load, index)))
            if len(pending) >= depth:
                i, future = pending.popleft()
                yield i, future.result()
        while pending:
            i, future = pending.popleft()
            yield i, future.result()


def batches(items: Iterable, size: int) -> Iterator[list]:
    """Consecutive lists of `size` items, the last one shorter."""
    items = iter(items)
    while batch := list(itertools.islice(items, size)):
        yield batch


def sum_over_processes(counts: np.ndarray) -> np.ndarray:
    """int64 counts summed over all processes (exact: sent as two int32 halves)."""
    counts = np.asarray(counts, np.int64)
    if jax.process_count() == 1:
        return counts
    high, low = np.divmod(counts, 1 << 30)
    gathered = np.asarray(
        multihost_utils.process_allgather(np.stack([high, low]).astype(np.int32)), np.int64
    )
    return (gathered[:, 0] * (1 << 30) + gathered[:, 1]).sum(axis=0)


def gather_over_processes(rows: np.ndarray, count: int) -> np.ndarray:
    """All `count` rows in dataset order, on every process, from each process's rows of its
    `process_indices(count)`."""
    processes = jax.process_count()
    if processes == 1:
        return np.asarray(rows)
    per_process = math.ceil(count / processes)
    padded = np.zeros((per_process, *rows.shape[1:]), rows.dtype)
    padded[: len(rows)] = rows
    gathered = np.asarray(multihost_utils.process_allgather(padded))  # [P, per_process, ...]
    # Row m of process p is example m * P + p.
    return gathered.swapaxes(0, 1).reshape(-1, *rows.shape[1:])[:count]


class Totals:
    """Sums of dicts of (device) arrays, each fetched `lag` additions late, so that the host
    never waits on the work it has just launched."""

    def __init__(self, zeros: dict[str, np.ndarray], lag: int = 2):
        self._sums = {name: np.array(value, np.int64) for name, value in zeros.items()}
        self._in_flight, self._lag = collections.deque(), lag

    def add(self, values: dict) -> None:
        self._in_flight.append(values)
        if len(self._in_flight) > self._lag:
            self._fetch()

    def _fetch(self) -> None:
        for name, value in jax.device_get(self._in_flight.popleft()).items():
            self._sums[name] += value

    def summed(self) -> dict[str, np.ndarray]:
        """Every process's sums added up (`sum_over_processes`)."""
        while self._in_flight:
            self._fetch()
        return {name: sum_over_processes(value) for name, value in self._sums.items()}


class Throughput:
    """Counts a process's images, logs its progress towards `total` of them with an ETA, and
    measures its images per second after the first model calls, whose time includes the
    compilation. `what` names the work in the log (`progress.Progress`)."""

    def __init__(self, total: int, what: str):
        self.images, self._steady_images, self._start = 0, 0, None
        self._progress = progress.Progress(total, what, unit="images")

    def add(self, count: int, outputs, *, first: bool) -> None:
        """`count` images whose model `outputs` (device arrays) came from the first calls or
        not: those of the first calls are waited for, and the clock starts."""
        self.images += count
        self._progress.update(count)
        if first:
            jax.block_until_ready(outputs)
            self._start = time.perf_counter()
        else:
            self._steady_images += count

    def rate(self) -> float | None:
        """None without images after the first calls, or with several processes (whose shares
        run side by side)."""
        if jax.process_count() > 1 or not self._steady_images:
            return None
        return self._steady_images / (time.perf_counter() - self._start)
