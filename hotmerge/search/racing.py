"""Racing: stop scoring a candidate once its place in the generation is known.

CMA-ES uses only which μ of its λ candidates are best (and their order), so a
candidate that is clearly outside the best μ, or clearly inside, needs no more items.

Items. Every task's documents are put in a random order fixed by the run's seed and
the generation (a random prefix is a fair sample of the rest), and the schedule's
shares cut that order into rounds: with [0.125, 0.25, 0.5, 1.0], round 0 scores the
first eighth of every task, round 1 the next eighth, and so on. Every candidate still
in the race scores the same items in the same order, so every comparison is paired.

The bound. For two candidates a and b, the weighted score difference on all items is
D = Σ_t mean over task t's documents of z, where z = Σ_s w_s (m_a - m_b) sums the specs
s that score task t (one per configured metric of the task) and lies in an interval of
width R_t = 2 Σ_s |w_s| for per-item values in [0, 1]. After n_t of task t's N_t
documents, drawn without replacement in a random order, the Hoeffding-Serfling
inequality (Serfling 1974; Bardenet and Maillard 2015, Theorem 1) for each task, summed
over the tasks' independent orders, gives with probability 1 - δ

    D >= D_seen - sqrt(log(1/δ) Σ_t R_t² ρ_t / (2 n_t)),   ρ_t = 1 - (n_t - 1) / N_t,

where D_seen is the difference on the items seen. ρ_t is the finite-population factor:
the bound tightens as the unseen share shrinks. a is *confidently better* than b when
D_seen exceeds that width. δ is per pairwise decision (`racing.delta`). Hoeffding's
bound is used rather than an empirical Bernstein bound: for paired 0/1 differences on
a few hundred items, the Bernstein range term, 3 R log(3/δ) / n, is the larger one.

Decisions, after every round, among the candidates still racing (A of them, with μ'
of the best-μ places not yet given to a candidate stopped as inside):
- a candidate that at least μ' others are confidently better than is stopped as
  outside the best μ;
- a candidate that is confidently better than at least A - μ' others is stopped as
  inside;
- except the current leader (the best estimate still racing), which always finishes,
  so that the generation's best gets a full score.
A stopped candidate's score, told to CMA-ES and written to the history with
"stopped_early": true, is its estimate on the items it saw. The rest finish every
round, and their scores equal a plain evaluation's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

OUTSIDE, INSIDE = "outside", "inside"


@dataclass(frozen=True)
class RacePlan:
    """Which items each round scores: the same on every rank."""

    doc_counts: dict[str, int]  # task -> number of documents
    schedule: tuple[float, ...]
    seed: int

    @property
    def rounds(self) -> int:
        return len(self.schedule)

    def order(self, generation: int) -> dict[str, np.ndarray]:
        """task -> its documents' indices in this generation's random order."""
        out = {}
        for number, (task, count) in enumerate(sorted(self.doc_counts.items())):
            rng = np.random.default_rng([self.seed, generation, number])
            out[task] = rng.permutation(count)
        return out

    def cut(self, count: int, round_: int) -> tuple[int, int]:
        """The slice of a task's order that round `round_` scores."""
        start = 0 if round_ == 0 else math.ceil(self.schedule[round_ - 1] * count)
        return start, math.ceil(self.schedule[round_] * count)

    def positions(self, generation: int, round_: int) -> dict[str, list[int]]:
        """task -> the indices of its documents that round `round_` scores."""
        out = {}
        for task, order in self.order(generation).items():
            start, stop = self.cut(len(order), round_)
            out[task] = order[start:stop].tolist()
        return out


def hoeffding_serfling_width(seen: dict[str, int], counts: dict[str, int], ranges: dict[str, float],
                             delta: float) -> float:
    """How far below the difference on the items seen the difference on all items can be
    (one-sided, probability δ): `seen`, `counts` and `ranges` per task."""
    total = 0.0
    for task, n in seen.items():
        if n == 0:
            return math.inf
        rho = 1.0 - (n - 1) / counts[task]
        total += ranges[task] ** 2 * rho / (2.0 * n)
    return math.sqrt(math.log(1.0 / delta) * total)


@dataclass
class Entry:
    """One candidate's race: its per-item values so far, per spec, in item order."""

    values: dict[int, list[float]] = field(default_factory=dict)
    rounds: int = 0
    stopped: str | None = None  # OUTSIDE or INSIDE when stopped early
    failed: bool = False


class Race:
    """The race of one generation on rank 0."""

    def __init__(self, plan: RacePlan, specs: list[tuple[str, str, float]], size: int, mu: int, delta: float,
                 generation: int):
        """`specs`: (task, metric, weight) per configured task; `size`: λ; `mu`: CMA-ES's μ."""
        self.plan = plan
        self.specs = [(task, weight) for task, _, weight in specs]
        self.metrics = [metric for _, metric, _ in specs]
        self.generation = generation
        self.mu = mu
        self.delta = delta
        self.entries = [Entry() for _ in range(size)]
        self.total_items = sum(plan.doc_counts.values())
        # The width of the interval that one item's weighted difference lies in, per task.
        self.ranges = {task: 2.0 * sum(abs(w) for t, w in self.specs if t == task) for task in plan.doc_counts}

    def racing(self) -> list[int]:
        """The candidates that score the next round."""
        return [i for i, e in enumerate(self.entries) if not e.failed and e.stopped is None
                and e.rounds < self.plan.rounds]

    def add(self, index: int, round_: int, values: dict[int, list[float]] | None) -> None:
        """Record candidate `index`'s values for round `round_` (None: the candidate failed)."""
        entry = self.entries[index]
        if values is None:
            entry.failed = True
            return
        assert entry.rounds == round_, (index, entry.rounds, round_)
        for spec, vs in values.items():
            entry.values.setdefault(int(spec), []).extend(vs)
        entry.rounds += 1

    def estimate(self, index: int) -> float:
        entry = self.entries[index]
        return sum(w * float(np.mean(entry.values[s])) for s, (_, w) in enumerate(self.specs))

    def _seen(self, index: int) -> dict[str, int]:
        entry = self.entries[index]
        return {task: len(entry.values[s]) for s, (task, _) in enumerate(self.specs)}

    def decide(self) -> list[int]:
        """Stop the candidates whose place is known; returns the ones stopped now."""
        alive = self.racing()
        if len(alive) <= 1:
            return []
        seen = self._seen(alive[0])
        if all(seen[task] >= count for task, count in self.plan.doc_counts.items()):
            return []  # everything scored: nothing left to save
        # The same items for every candidate racing, so one width serves every pair.
        width = hoeffding_serfling_width(seen, self.plan.doc_counts, self.ranges, self.delta)
        estimates = {i: self.estimate(i) for i in alive}
        better = {i: {j for j in alive if estimates[j] - estimates[i] > width} for i in alive}
        places = self.mu - sum(1 for e in self.entries if e.stopped == INSIDE)
        leader = max(alive, key=lambda i: (estimates[i], -i))
        stopped = []
        for i in alive:
            if i == leader:
                continue
            worse = sum(1 for j in alive if i in better[j])
            if len(better[i]) >= places:
                self.entries[i].stopped = OUTSIDE
                stopped.append(i)
            elif worse >= len(alive) - places:
                self.entries[i].stopped = INSIDE
                stopped.append(i)
        return stopped

    def items_seen(self, index: int) -> int:
        """How many documents the candidate was scored on, over all tasks."""
        entry = self.entries[index]
        first = {t: s for s, (t, _) in reversed(list(enumerate(self.specs)))}
        return sum(len(entry.values.get(s, ())) for s in first.values())

    def scores(self, index: int) -> tuple[float, float, dict]:
        """(score, stderr, results) on the items seen, aggregated as lm-eval does: a
        candidate that finished every round gets a plain evaluation's numbers."""
        from lm_eval.api.metrics import mean, mean_stderr

        entry = self.entries[index]
        order = self.plan.order(self.generation)
        score, variance, results = 0.0, 0.0, {}
        for s, ((task, weight), key) in enumerate(zip(self.specs, self.metrics)):
            seen = order[task][:len(entry.values[s])]
            # lm-eval's document order, so that a full score adds up exactly as lm-eval's
            values = [v for _, v in sorted(zip(seen.tolist(), entry.values[s]))]
            metric, _, filter_key = key.partition(",")
            value = mean(values)
            se = mean_stderr(values) if len(values) > 1 else float("nan")
            results.setdefault(task, {})[key] = value
            results[task][f"{metric}_stderr,{filter_key}"] = se
            score += weight * value
            variance += (weight * se) ** 2
        return score, math.sqrt(variance), results
