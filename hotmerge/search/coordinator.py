"""The search loop: rank 0 runs CMA-ES, every rank evaluates candidates.

Single process: the loop evaluates candidates itself. Under torchrun (gloo
process group), rank 0 keeps one dispatcher thread per other rank, each handing
its rank the next unevaluated candidate of the generation as soon as it is free,
while rank 0's main thread evaluates candidates too. Messages are fixed-size
tensors: a genotype out, a JSON result back.

Every finished evaluation is appended to the run's history before anything else
happens, and the search state is saved after every generation, so a run killed
at any moment resumes with no finished evaluation lost: a resumed run asks
CMA-ES for the same generation again and takes the results it already has.

Failures (errors.py): a candidate error is recorded and scored worst. A bug
(any other exception in a candidate) is recorded too, with its traceback in the run
directory's errors/ folder; when one rank, rank 0 included, raises bugs for
MAX_BUGS_IN_A_ROW candidates in a row, no more candidates are handed out, the
generation is left untold, and the run stops with its state saved. A resumed run
asks that generation again and evaluates its candidates that met a bug again, so once
the bug is fixed the search goes on as if they had never failed.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from hotmerge.errors import BUG
from hotmerge.search.strategy import Search
from hotmerge.run.storage import RunDir

RESULT_BYTES = 1 << 18
CMD_STOP, CMD_EVAL = 0.0, 1.0
MAX_BUGS_IN_A_ROW = 3


@dataclass
class BugStop:
    """Why the coordinator stopped handing out candidates: bugs in a row on one rank."""

    rank: int
    count: int
    error: str
    traceback_file: Path | None


@dataclass
class Progress:
    """What the display shows; updated by the loop."""

    max_fevals: int
    evaluations: int = 0
    generation: int = 0
    best_score: float | None = None
    best_stderr: float | None = None  # the best score's standard error, when its metrics have one
    last_score: float | None = None
    failures: int = 0
    started: float = field(default_factory=time.time)
    new_evaluations: int = 0  # this process's, for the rate

    @property
    def per_minute(self) -> float:
        elapsed = time.time() - self.started
        return 60.0 * self.new_evaluations / elapsed if elapsed > 0 else 0.0

    @property
    def eta_seconds(self) -> float | None:
        rate = self.per_minute
        if rate <= 0:
            return None
        return 60.0 * max(0, self.max_fevals - self.evaluations) / rate


def distributed_context() -> tuple[int, int]:
    """(rank, world size); initialises the gloo group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        # torchrun's agent keeps one store across restarts of the group: keys from an
        # earlier attempt (the gloo addresses of dead ranks) would still be there, and
        # a restarted rank would try to connect to them. Each attempt gets its own keys.
        store, rank, world = next(dist.rendezvous("env://"))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"hotmerge/attempt_{attempt}", store)
        dist.init_process_group(backend="gloo", store=store, rank=rank, world_size=world)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def same_genotype(a, b) -> bool:
    return np.array_equal(np.asarray(a, dtype=float), np.asarray(b, dtype=float))


class Coordinator:
    """Rank 0's loop. `evaluate(x) -> result dict` runs one candidate on this process."""

    def __init__(self, run: RunDir, search: Search, evaluate: Callable[[np.ndarray], dict],
                 max_fevals: int, on_result: Callable[[dict], None], world_size: int = 1,
                 genotype_size: int = 0, log: Callable[[str], None] = print):
        self.run = run
        self.search = search
        self.evaluate = evaluate
        self.max_fevals = max_fevals
        self.on_result = on_result
        self.world_size = world_size
        self.genotype_size = genotype_size
        self.log = log
        self.stop_requested = False
        self.history = {(r["generation"], r["index"]): r for r in run.read_history()}
        self.progress = Progress(max_fevals=max_fevals, evaluations=len(self.history))
        for record in self.history.values():
            self._track(record)
        self._lock = threading.Lock()
        self.bugs_in_a_row: dict[int, int] = {}
        self.bug_stop: BugStop | None = None

    def _track(self, record: dict) -> None:
        score = record.get("score")
        self.progress.last_score = score
        if score is None:
            self.progress.failures += 1
        elif self.progress.best_score is None or score > self.progress.best_score:
            self.progress.best_score = score
            self.progress.best_stderr = record.get("stderr")

    def run_loop(self) -> None:
        try:
            while not self.stop_requested and not self.search.done(self.progress.evaluations, self.max_fevals):
                candidates = self.search.ask()
                generation = self.search.generation
                self.progress.generation = generation
                scores = self._evaluate_generation(generation, candidates)
                if scores is None:  # stopped mid-generation; state stays at the last whole one
                    break
                self.search.tell(candidates, scores)
                # Go on from the state as saved, exactly what a resumed run would load.
                self.search = Search.from_state(self.run.save_search(self.search.state))
        finally:
            self._stop_workers()

    def _evaluate_generation(self, generation: int, candidates: list[np.ndarray]) -> list | None:
        records: dict[int, dict] = {}
        todo = deque()
        for index, x in enumerate(candidates):
            old = self.history.get((generation, index))
            # A bug says nothing about the candidate: a resumed run evaluates it again.
            if old is not None and old.get("failure") != BUG and same_genotype(old["genotype"], x):
                records[index] = old
            else:
                todo.append(index)

        def finish(index: int, result: dict, rank: int) -> None:
            record = {"generation": generation, "index": index, "rank": rank,
                      "genotype": candidates[index].tolist(), **result, "finished_at": time.time()}
            with self._lock:
                self._record_bug(record)
                self.run.append_history(record)
                if (generation, index) not in self.history:  # a bug evaluated again counts once
                    self.progress.evaluations += 1
                self.history[(generation, index)] = record
                records[index] = record
                self.progress.new_evaluations += 1
                self._track(record)
                self.on_result(record)

        def take() -> int | None:
            with self._lock:
                if self.stop_requested or not todo:
                    return None
                return todo.popleft()

        threads = [
            threading.Thread(target=self._feed_rank, args=(rank, candidates, take, finish), daemon=True)
            for rank in range(1, self.world_size)
        ]
        for thread in threads:
            thread.start()
        try:
            while (index := take()) is not None:
                finish(index, self.evaluate(candidates[index]), 0)
        except KeyboardInterrupt:
            # Ctrl-C: let the other ranks finish what they hold, then stop cleanly.
            self.stop_requested = True
        for thread in threads:
            thread.join()
        if self.bug_stop is not None or len(records) < len(candidates):
            return None  # not told: a resumed run evaluates what is missing (bugs included)
        return [records[i].get("score") for i in range(len(candidates))]

    def _record_bug(self, record: dict) -> None:
        """Keep a bug's traceback in the run directory and count bugs in a row per rank."""
        rank = record["rank"]
        text = record.pop("traceback", None)
        if record.get("failure") != BUG:
            self.bugs_in_a_row[rank] = 0
            return
        path = None
        if text:
            name = f"g{record['generation']:04d}-c{record['index']:03d}-r{rank}.txt"
            path = self.run.save_traceback(name, text)
            record["traceback_file"] = str(path.relative_to(self.run.path))
        count = self.bugs_in_a_row.get(rank, 0) + 1
        self.bugs_in_a_row[rank] = count
        where = f"; traceback in {path}" if path is not None else ""
        self.log(f"bug in candidate {record['index']} of generation {record['generation']} on rank {rank}: "
                 f"{record.get('error')}{where}")
        if count >= MAX_BUGS_IN_A_ROW and self.bug_stop is None:
            self.bug_stop = BugStop(rank=rank, count=count, error=str(record.get("error")), traceback_file=path)
            self.stop_requested = True

    def _feed_rank(self, rank: int, candidates, take, finish) -> None:
        while (index := take()) is not None:
            finish(index, self._remote_evaluate(rank, index, candidates[index]), rank)

    def _remote_evaluate(self, rank: int, index: int, x: np.ndarray) -> dict:
        """Have `rank` evaluate candidate `index` (genotype x); its result dict."""
        message = torch.zeros(2 + self.genotype_size, dtype=torch.float64)
        message[0], message[1] = CMD_EVAL, index
        message[2:] = torch.from_numpy(x)
        dist.send(message, dst=rank)
        reply = torch.zeros(RESULT_BYTES, dtype=torch.uint8)
        dist.recv(reply, src=rank)
        return _decode_result(reply)

    def _stop_workers(self) -> None:
        if self.world_size <= 1:
            return
        message = torch.zeros(2 + self.genotype_size, dtype=torch.float64)
        message[0] = CMD_STOP
        for rank in range(1, self.world_size):
            dist.send(message, dst=rank)


def worker_loop(evaluate: Callable[[np.ndarray], dict], genotype_size: int) -> None:
    """Ranks other than 0: evaluate what rank 0 sends until it says stop."""
    while True:
        message = torch.zeros(2 + genotype_size, dtype=torch.float64)
        dist.recv(message, src=0)
        if message[0].item() == CMD_STOP:
            return
        result = evaluate(message[2:].numpy().copy())
        dist.send(_encode_result(result), dst=0)


def _encode_result(result: dict[str, Any]) -> torch.Tensor:
    data = json.dumps(result, default=float).encode()
    if len(data) + 4 > RESULT_BYTES:
        data = json.dumps({"score": None, "failure": BUG,
                           "error": f"the result is too large to send ({len(data)} bytes)"}).encode()
    buffer = torch.zeros(RESULT_BYTES, dtype=torch.uint8)
    buffer[:4] = torch.tensor(list(len(data).to_bytes(4, "little")), dtype=torch.uint8)
    buffer[4:4 + len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return buffer


def _decode_result(buffer: torch.Tensor) -> dict[str, Any]:
    raw = bytes(buffer.numpy())
    length = int.from_bytes(raw[:4], "little")
    return json.loads(raw[4:4 + length])
