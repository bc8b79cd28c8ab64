"""The one token loop every generator in the runtime uses: `Pipeline.generate` / `stream`, the latency report's
timed requests and the accuracy evaluation's batched answers.

The caller owns the model: it passes the prefill's logits and a `step` function that runs one decode step for a
batch of chosen tokens (the function keeps the KV cache and the positions). The loop owns everything about the
tokens: greedy or sampled choice (`Sampling`), teacher forcing, end-of-sequence per row, the step budget, per-step
timing, and yields each step's tokens as they come (streaming).

Shape legend: B batch, V vocabulary.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np

from visprune.errors import ConfigError

Step = Callable[[np.ndarray, int], np.ndarray]  # (tokens [B], step index) -> next logits [B, V]


@dataclass(frozen=True)
class Sampling:
    """How a token is chosen from logits: greedy (temperature 0, the default) or sampled from the softmax at
    `temperature`, restricted to the `top_k` most likely (0: all) and to the smallest set whose probability
    reaches `top_p`; `seed` makes a sampled generation repeatable."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0.0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}.", "Use 0 for greedy, e.g. 0.7.")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}.", "Use 0 for no limit, e.g. 50.")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}.", "Use 1 for no limit, e.g. 0.9.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def chooser(self) -> Callable[[np.ndarray], np.ndarray]:
        """logits [B, V] -> tokens [B]; a sampled chooser holds its own seeded generator."""
        if self.greedy:
            return lambda logits: np.argmax(logits, axis=-1)
        rng = np.random.default_rng(self.seed)
        return lambda logits: np.array([rng.choice(len(p), p=p) for p in self._probabilities(logits)])

    def _probabilities(self, logits: np.ndarray) -> np.ndarray:
        scaled = logits.astype(np.float64) / self.temperature
        if self.top_k:
            kth = np.sort(scaled, axis=-1)[:, -min(self.top_k, scaled.shape[-1])][:, None]
            scaled = np.where(scaled < kth, -np.inf, scaled)
        probs = np.exp(scaled - scaled.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        if self.top_p < 1.0:
            order = np.argsort(-probs, axis=-1)
            sorted_probs = np.take_along_axis(probs, order, axis=-1)
            outside = np.cumsum(sorted_probs, axis=-1) - sorted_probs >= self.top_p  # keep the first over top_p
            np.put_along_axis(probs, order, np.where(outside, 0.0, sorted_probs), axis=-1)
            probs /= probs.sum(axis=-1, keepdims=True)
        return probs


GREEDY = Sampling()


def rows_chooser(sampling: "Sampling | Sequence[Sampling]") -> Callable[[np.ndarray], np.ndarray]:
    """logits [B, V] -> tokens [B] with one Sampling for all rows or one per row (each sampled row keeps its own
    seeded generator, so a request samples the same tokens alone or in a batch)."""
    if isinstance(sampling, Sampling):
        return sampling.chooser()
    if all(s.greedy for s in sampling):
        return GREEDY.chooser()
    choosers = [s.chooser() for s in sampling]
    return lambda logits: np.array([choose(logits[row:row + 1])[0] for row, choose in enumerate(choosers)])


@dataclass
class TokenLoop:
    """Result of `run_tokens`: chosen tokens [B, n] (rows past their EOS keep choosing; see `row_tokens`), the
    logits each was chosen from, and the wall time of every decode step."""

    tokens: list[np.ndarray] = field(default_factory=list)  # n steps of [B]
    logits: list[np.ndarray] = field(default_factory=list)  # n steps of [B, V]
    step_seconds: list[float] = field(default_factory=list)  # n - 1 decode steps

    def row_tokens(self, row: int, eos: int | None) -> list[int]:
        """Row `row`'s tokens up to and including its first EOS."""
        tokens = [int(step[row]) for step in self.tokens]
        return tokens[:tokens.index(eos) + 1] if eos is not None and eos in tokens else tokens


Chosen = tuple[np.ndarray, np.ndarray, "float | None"]  # tokens [B], their logits [B, V], the step's seconds


def iterate_tokens(first_logits: np.ndarray, step: Step, max_new_tokens: "int | Sequence[int]",
                   eos: int | None = None, sampling: "Sampling | Sequence[Sampling]" = GREEDY,
                   forced: list[int] | None = None, clock: Callable[[], float] = time.perf_counter,
                   ended: Callable[[np.ndarray], np.ndarray] | None = None) -> Iterator[Chosen]:
    """Yield (tokens [B], the logits they came from [B, V], the decode step's seconds or None for the prefill's)
    until every row is done: it produced `eos` (None: never), used its `max_new_tokens` (one for all rows, or one
    per row), or `ended(tokens)` (the caller's per-row verdict, e.g. a stop string; bool [B]) said so. Rows that
    are done keep being computed with the batch; their tokens are the caller's to ignore. `forced` (batch 1)
    feeds the given tokens instead of choosing and runs exactly that many steps."""
    choose, logits, seconds = rows_chooser(sampling), first_logits, None
    budgets = np.broadcast_to(np.asarray([len(forced)] if forced else max_new_tokens), (len(first_logits),))
    done = np.zeros(len(first_logits), bool)
    for index in range(int(budgets.max())):
        tokens = np.array([forced[index]]) if forced else choose(logits)
        yield tokens, logits, seconds
        done |= (tokens == eos) if eos is not None and not forced else False
        done |= (budgets <= index + 1) | (ended(tokens) if ended else False)
        if done.all():
            return
        start = clock()
        logits = step(tokens, index)
        seconds = clock() - start


def run_tokens(first_logits: np.ndarray, step: Step, max_new_tokens: "int | Sequence[int]", eos: int | None = None,
               sampling: "Sampling | Sequence[Sampling]" = GREEDY, forced: list[int] | None = None,
               clock: Callable[[], float] = time.perf_counter) -> TokenLoop:
    """`iterate_tokens` run to the end."""
    loop = TokenLoop()
    for tokens, logits, seconds in iterate_tokens(first_logits, step, max_new_tokens, eos, sampling, forced, clock):
        loop.tokens.append(tokens)
        loop.logits.append(logits)
        if seconds is not None:
            loop.step_seconds.append(seconds)
    return loop
