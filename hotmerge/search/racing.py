"""Racing: stop scoring a candidate once its place in the generation is known.

CMA-ES uses only which μ of its λ candidates are best (and their order), so a
candidate that is clearly outside the best μ, or clearly inside, needs no more items.

Items. Every task's documents are put in a random order fixed by the run's seed and
the generation (a random prefix is a fair sample of the rest), and the schedule's
shares cut that order into rounds: with [0.125, 0.25, 0.5, 1.0], round 0 scores the
first eighth of every task, round 1 the next eighth, and so on. Every candidate still
in the race scores the same items in the same order, so every comparison is paired.

The bound. For two candidates a and b, the weighted score difference on all items,
D = Σ_s w_s (mean_s(a) - mean_s(b)), is estimated from the n items seen so far. Each
seen item contributes y = Σ_s w_s N/N_t (m_a - m_b) (its share of D), bounded by
R = 2 max_t Σ_s |w_s| N/N_t for per-item values in [0, 1]. The empirical Bernstein
bound (Audibert, Munos and Szepesvári 2009, Theorem 1) puts the mean of y within

    sqrt(2 V log(3/δ) / n) + 3 R log(3/δ) / n

of its expectation with probability 1 - δ, V being the sample variance of y. Only the
unseen share (1 - n/N) of D is unknown, so the width is scaled by it: at n = N the
difference is exact. a is *confidently better* than b when the estimate of D minus
this width is above 0. δ is per pairwise decision (`racing.delta`).

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


def bernstein_width(y: np.ndarray, value_range: float, delta: float, seen_share: float) -> float:
    """How far the mean over all items can be from the mean of the n seen values `y`."""
    n = len(y)
    if n == 0:
        return math.inf
    log_term = math.log(3.0 / delta)
    width = math.sqrt(2.0 * float(np.var(y)) * log_term / n) + 3.0 * value_range * log_term / n
    return (1.0 - seen_share) * width


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
        total = sum(plan.doc_counts.values())
        self.total_items = total
        # Each item's share of the weighted score: Σ_s w_s N / N_t over the specs of its task.
        self.share = {task: sum(abs(w) for t, w in self.specs if t == task) * total / count
                      for task, count in plan.doc_counts.items()}
        self.value_range = 2.0 * max(self.share.values())

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
            bad = [v for v in vs if not 0.0 <= v <= 1.0]
            if bad:
                task = self.specs[int(spec)][0]
                raise ValueError(f"racing needs per-item values in [0, 1], and task {task} gave {bad[0]}: "
                                 "turn racing off for this metric")
            entry.values.setdefault(int(spec), []).extend(vs)
        entry.rounds += 1

    def estimate(self, index: int) -> float:
        entry = self.entries[index]
        return sum(w * float(np.mean(entry.values[s])) for s, (_, w) in enumerate(self.specs))

    def _item_shares(self, index: int) -> np.ndarray:
        """The candidate's per-item contributions y (see the module doc), items in task order."""
        entry = self.entries[index]
        parts = []
        for task in sorted(self.plan.doc_counts):
            count = self.plan.doc_counts[task]
            total = None
            for s, (t, w) in enumerate(self.specs):
                if t == task:
                    term = w * self.total_items / count * np.asarray(entry.values[s])
                    total = term if total is None else total + term
            parts.append(total)
        return np.concatenate(parts)

    def decide(self) -> list[int]:
        """Stop the candidates whose place is known; returns the ones stopped now."""
        alive = self.racing()
        if len(alive) <= 1:
            return []
        seen = len(self._item_shares(alive[0]))
        share = seen / self.total_items
        if share >= 1.0:
            return []
        ys = {i: self._item_shares(i) for i in alive}
        estimates = {i: self.estimate(i) for i in alive}
        better = {i: set() for i in alive}  # i -> the candidates confidently better than i
        for a in alive:
            for b in alive:
                if a < b:
                    width = bernstein_width(ys[a] - ys[b], self.value_range, self.delta, share)
                    difference = estimates[a] - estimates[b]
                    if difference - width > 0:
                        better[b].add(a)
                    elif -difference - width > 0:
                        better[a].add(b)
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
