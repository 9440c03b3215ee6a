"""Racing: stop scoring a candidate once its place in the generation is known.

CMA-ES uses only which μ of its λ candidates are best (and their order), so a
candidate that is clearly outside the best μ, or clearly inside, needs no more items.

Items. All the search tasks' documents are pooled and put in one random order, fixed
by the run's seed and the generation, and the schedule's shares cut that order into
rounds: with [0.125, 0.25, ..., 1.0], round 0 scores the first eighth of the pool,
round 1 the next eighth, and so on (each cut rounded to whole forward batches of the
runtime). Every candidate still in the race scores the same items in the same order,
so every comparison is paired, and the items seen are a sample without replacement
from the pool: a random prefix is a fair sample of the rest.

The score as a mean over the pool. With N documents in all, N_t of them task t's, a
candidate's weighted score S = Σ_s w_s · (mean of spec s over its task's documents) is
the mean over the pool of c = (N / N_t) Σ_{s scores t} w_s m_s, where m_s in [0, 1] is
the document's value for spec s. For two candidates a and b, D = S_a - S_b is the pool
mean of y = c_a - c_b, which lies in [-r, r] with r = max_t (N / N_t) Σ_{s scores t} |w_s|.

The test. a is *confidently better* than b when a test of "D <= 0" rejects at level δ'
(below).
The test is a betting (capital-process) test for sampling without replacement,
Waudby-Smith and Ramdas ("Confidence sequences for sampling without replacement",
NeurIPS 2020; "Estimating means of bounded random variables by betting", JRSS-B 2024):
on x_i = (y_i + r) / 2r in [0, 1], the i-th item scored, D <= 0 says the pool mean of x
is at most 1/2, and then, given the items before i, x_i's expected value is at most

    m_i = (N / 2 - Σ_{j<i} x_j) / (N - i + 1)        (the finite pool: what is left)

so the capital K_n = Π_{i<=n} (1 + λ_i (x_i - m_i)), with bets λ_i in [0, 3/4 · 1/m_i]
chosen from the items before i, is a nonnegative supermartingale with K_0 = 1. By
Ville's inequality it ever reaches 1/δ with probability at most δ, at *any* item count:
the test rejects as soon as it does. The bets are aGRAPA's, λ_i = (x̄ - m_i) / (s² +
(x̄ - m_i)²), from the mean x̄ and variance s² of the items before i (and one pseudo-item
at 1/2, variance 1/4), clipped to the range above. Three properties matter here:
- it adapts to the variance: candidates of one generation agree on most items, so the
  paired differences are mostly ties, and a few one-sided wins are strong evidence:
  12 wins and 1 loss among 100 items of 500, the rest ties, reject at level 0.05, where
  the Hoeffding-Serfling bound, which only knows the range, needs a lead of 22 wins
  (bench/RESULTS.md has the saving this gives on the smol family);
- it is valid at every round at once (Ville), so a pairwise test run after every round
  rejects a true "D <= 0" at some round with probability at most its level;
- m_i is the finite pool's: the test sharpens as the pool runs out.

δ bounds the whole generation (`racing.delta`). Each ordered pair (a, b) of the
generation's λ candidates is tested at level δ' = δ / (λ(λ - 1)), after every round
both are still racing. A decision is wrong only if some test rejected a true null; there
are at most λ(λ - 1) tests, each wrong over the whole race with probability at most δ'
(Ville, above), so by Bonferroni's inequality the chance that *any* decision of a
generation is wrong is at most δ. At λ = 16 and δ = 0.05 a pair is tested at
δ' = 2.1e-4 (a threshold of 8.5 on the log-capital instead of 3.0): the price of a
guarantee per generation instead of per pair (bench/RESULTS.md measures the saving).
tests/test_racing.py checks the rate by simulation on constructed near-ties.

Decisions, after every round, among the candidates still racing (A of them, with μ'
of the best-μ places not yet given to a candidate stopped as inside):
- a candidate that at least μ' others are confidently better than is stopped as
  outside the best μ;
- a candidate that is confidently better than at least A - μ' others is stopped as
  inside;
- except the current leader (the best estimate still racing), which always finishes,
  so that the generation's best gets a full score.
No decision is taken before every task has at least one item scored. The history keeps,
for a stopped candidate ("stopped_early": true), its estimate on the items it saw (each
task's mean, weighted) with its standard error; the rest finish every round, and their
scores equal a plain evaluation's.

What CMA-ES is told (`Race.told`) is the race's result, not the raw estimates: an
estimate on a few items can lie above a finisher's full score, and pycma weights every
rank (its active update gives the worst ranks negative weights). Three tiers, each
ordered by its estimate: the race's best μ (the candidates stopped as inside and the
best finishers), then the other finishers, then the candidates stopped as outside.
The best μ are told their estimates; each lower tier is shifted down by the spread of
the generation's estimates plus one, so every value told below a tier lies below all of
it. A failed candidate is told the worst value. So when no decision is wrong, CMA-ES
recombines exactly the race's best μ, and every outside candidate ranks below every
finisher and every inside one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

OUTSIDE, INSIDE = "outside", "inside"
PAIRS_AT_ONCE = 64  # pairs tested in one array: memory stays small for large pools and populations


@dataclass(frozen=True)
class RacePlan:
    """Which items each round scores: the same on every rank."""

    doc_counts: dict[str, int]  # task -> number of documents
    schedule: tuple[float, ...]
    seed: int
    batch: int = 1  # documents the runtime scores in one forward batch

    @property
    def total(self) -> int:
        return sum(self.doc_counts.values())

    @property
    def ends(self) -> tuple[int, ...]:
        """Where each round ends in the pool's order: each share of the pool rounded to whole
        batches, without empty rounds, the last at the pool's end. A round of 68 documents
        on batches of 64 pays for a second, nearly empty batch: on the smol family's 540
        items, eight such rounds cost 1.26× one call."""
        ends = []
        for share in self.schedule[:-1]:
            end = math.floor(share * self.total / self.batch + 0.5) * self.batch
            if 0 < end < self.total and (not ends or end > ends[-1]):
                ends.append(end)
        return (*ends, self.total)

    @property
    def rounds(self) -> int:
        return len(self.ends)

    @property
    def pool(self) -> list[tuple[str, int]]:
        """The pool's (task, document index) pairs in canonical order: task by task."""
        return [(task, doc) for task, count in sorted(self.doc_counts.items()) for doc in range(count)]

    def order(self, generation: int) -> list[tuple[str, int]]:
        """The pool's (task, document index) pairs in this generation's random order."""
        pool = self.pool
        permutation = np.random.default_rng([self.seed, generation]).permutation(len(pool))
        return [pool[k] for k in permutation]

    def pool_positions(self, items: list[int]) -> dict[str, list[int]]:
        """task -> its documents among the canonical pool's items `items`, in that order."""
        pool = self.pool
        return self._by_task([pool[i] for i in items])

    def cut(self, round_: int) -> tuple[int, int]:
        """The slice of the pool's order that round `round_` scores."""
        ends = self.ends
        return (0 if round_ == 0 else ends[round_ - 1]), ends[round_]

    def task_orders(self, generation: int, items: int | None = None) -> dict[str, list[int]]:
        """task -> its documents among the pool's first `items` (default: all), in order."""
        return self._by_task(self.order(generation)[:items])

    def positions(self, generation: int, round_: int) -> dict[str, list[int]]:
        """task -> the indices of its documents that round `round_` scores, in order (every
        task is a key; a round may hold none of a small task's documents)."""
        return self.span_positions(generation, *self.cut(round_))

    def span_positions(self, generation: int, start: int, stop: int) -> dict[str, list[int]]:
        """task -> the indices of its documents among the pool order's items start..stop."""
        return self._by_task(self.order(generation)[start:stop])

    def whole_batches(self, items: float) -> int:
        """`items` rounded to whole forward batches, at least one batch, at most the pool."""
        return int(min(self.total, max(self.batch, math.floor(items / self.batch + 0.5) * self.batch)))

    def pool_values(self, specs: list[tuple[str, float]], generation: int, start: int, stop: int,
                    values: dict[int, list[float]]) -> np.ndarray:
        """Each item's share of the weighted score as a pool mean, c = (N / N_t) Σ w_s m_s
        (module docstring), for the items start..stop of the pool order, from their values
        per spec (in that order)."""
        tasks = np.array([task for task, _ in self.order(generation)[start:stop]])
        out = np.zeros(stop - start)
        for s, (task, weight) in enumerate(specs):
            out[tasks == task] += self.total / self.doc_counts[task] * weight * np.asarray(values[s], dtype=float)
        return out

    def _by_task(self, items: list[tuple[str, int]]) -> dict[str, list[int]]:
        out = {task: [] for task in sorted(self.doc_counts)}
        for task, doc in items:
            out[task].append(doc)
        return out


def betting_evidence(x: np.ndarray, population: int) -> np.ndarray:
    """Per row of `x` (values in [0, 1] drawn without replacement from `population` items,
    in order): the log of the highest capital reached against "the population's mean is
    at most 1/2" (module docstring). It reaches log(1/δ) with probability at most δ when
    that is true, at any item count."""
    rows, n = x.shape
    i = np.arange(1, n + 1)
    total = np.cumsum(x, axis=1)
    seen_before = np.concatenate([np.zeros((rows, 1)), total[:, :-1]], axis=1)
    null_mean = (population / 2 - seen_before) / (population - i + 1)
    # The items' mean and variance before each item, from one pseudo-item at 1/2 (variance 1/4).
    mean = (0.5 + total) / (i + 1)
    variance = (0.25 + np.cumsum((x - mean) ** 2, axis=1)) / (i + 1)
    mean_before = np.concatenate([np.full((rows, 1), 0.5), mean[:, :-1]], axis=1)
    variance_before = np.concatenate([np.full((rows, 1), 0.25), variance[:, :-1]], axis=1)
    edge = mean_before - null_mean
    # 1 + λ (x - m) >= 1 - λ m >= 1/4 keeps the capital positive; m <= 0 puts no limit on λ
    # (the pool already holds more than the null allows), so any cap serves.
    cap = np.where(null_mean > 0, 0.75 / np.maximum(null_mean, 1e-12), 1e6)
    bets = np.clip(edge / (variance_before + edge ** 2), 0.0, cap)
    return np.max(np.cumsum(np.log1p(bets * (x - null_mean)), axis=1), axis=1)


def pair_level(delta: float, size: int) -> float:
    """The level each ordered pair is tested at, so that a generation of `size` candidates
    makes any wrong decision with probability at most `delta` (module docstring)."""
    return delta / max(1, size * (size - 1))


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
        """`specs`: (task, metric, weight) per configured task; `size`: λ; `mu`: CMA-ES's μ;
        `delta`: the chance that any decision of the generation is wrong."""
        self.plan = plan
        self.specs = [(task, weight) for task, _, weight in specs]
        self.metrics = [metric for _, metric, _ in specs]
        self.generation = generation
        self.mu = mu
        self.delta = delta
        self.threshold = math.log(1.0 / pair_level(delta, size))
        self.entries = [Entry() for _ in range(size)]
        self.order = plan.order(generation)
        self.order_tasks = np.array([task for task, _ in self.order])
        # One item's share of the weighted score, as a pool mean: c = (N / N_t) Σ w_s m_s.
        self.scale = {task: plan.total / count for task, count in plan.doc_counts.items()}
        # A paired difference of c lies in [-r, r].
        self.r = max(self.scale[task] * sum(abs(w) for t, w in self.specs if t == task) for task in plan.doc_counts)

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

    def _pool_values(self, index: int, items: int) -> np.ndarray:
        """The candidate's c (module docstring) on the pool's first `items` items, in order."""
        entry = self.entries[index]
        tasks = self.order_tasks[:items]
        out = np.zeros(items)
        for s, (task, weight) in enumerate(self.specs):
            out[tasks == task] += self.scale[task] * weight * np.asarray(entry.values[s], dtype=float)
        return out

    def decide(self) -> list[int]:
        """Stop the candidates whose place is known; returns the ones stopped now."""
        alive = self.racing()
        if len(alive) <= 1 or self.r == 0:
            return []
        items = self.items_seen(alive[0])  # the same items for every candidate racing
        if items >= self.plan.total:
            return []  # everything scored: nothing left to save
        if any(not self.entries[alive[0]].values[s] for s in range(len(self.specs))):
            return []  # a task with no item yet has no estimate
        pool = {i: self._pool_values(i, items) for i in alive}
        pairs = [(a, b) for a in alive for b in alive if a != b]
        better = {i: set() for i in alive}
        for start in range(0, len(pairs), PAIRS_AT_ONCE):
            block = pairs[start:start + PAIRS_AT_ONCE]
            x = np.stack([(pool[a] - pool[b] + self.r) / (2.0 * self.r) for a, b in block])
            for (a, b), evidence in zip(block, betting_evidence(x, self.plan.total)):
                if evidence >= self.threshold:
                    better[b].add(a)
        estimates = {i: self.estimate(i) for i in alive}
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

    def told(self) -> list[float]:
        """What CMA-ES is told for each candidate, in score units (module docstring)."""
        from hotmerge.search.strategy import FAILED_TOLD

        scored = [i for i, e in enumerate(self.entries) if not e.failed]
        estimates = {i: self.estimate(i) for i in scored}
        shift = (max(estimates.values()) - min(estimates.values()) + 1.0) if estimates else 0.0
        inside = [i for i in scored if self.entries[i].stopped == INSIDE]
        finished = sorted((i for i in scored if self.entries[i].stopped is None), key=lambda i: (-estimates[i], i))
        best = set(inside) | set(finished[:max(0, self.mu - len(inside))])
        told = [FAILED_TOLD] * len(self.entries)
        for i in scored:
            tier = 0 if i in best else 1 if self.entries[i].stopped is None else 2
            told[i] = estimates[i] - tier * shift
        return told

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
        order = self.plan.task_orders(self.generation, self.items_seen(index))
        score, variance, results = 0.0, 0.0, {}
        for s, ((task, weight), key) in enumerate(zip(self.specs, self.metrics)):
            # lm-eval's document order, so that a full score adds up exactly as lm-eval's
            values = [v for _, v in sorted(zip(order[task], entry.values[s], strict=True))]
            metric, _, filter_key = key.partition(",")
            value = mean(values)
            se = mean_stderr(values) if len(values) > 1 else float("nan")
            results.setdefault(task, {})[key] = value
            results[task][f"{metric}_stderr,{filter_key}"] = se
            score += weight * value
            variance += (weight * se) ** 2
        return score, math.sqrt(variance), results
