"""The training progress bar, true to the device: a step counts once it is complete.

JAX returns from a step as soon as it is dispatched, so a bar that counts dispatches runs ahead
of the device and then stalls wherever the host waits (every log point). `Progress` counts a
step when its loss is ready (`jax.Array.is_ready`, which does not wait), and waits for it once
`ahead` more steps have been dispatched: the bar counts completed steps only, at most `ahead`
behind the device, while the steps dispatched since stay queued, so the device never waits
for the host.

The loss, tokens/s and time left are smoothed over completed steps (`Smoothed`). Time outside
the steps is on the elapsed clock but not in the step time: evaluation, checkpoints and
logging (`paused`) recur, so the time left spreads them over the steps still to come;
compiling a new batch shape (`off_clock`, also within a pause) happens once per shape and
is left out of it.
"""

from __future__ import annotations

import collections
import contextlib
import time

from tqdm import tqdm

AHEAD = 2  # steps dispatched beyond the newest one counted
BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}{postfix}"


class Smoothed:
    """The running mean of the first 1/weight values, then an exponential moving average of
    that weight: steady from the first value on, and following slow drift after."""

    def __init__(self, weight: float):
        self.weight, self.count, self.value = weight, 0, None

    def add(self, x: float) -> float:
        self.count += 1
        share = max(self.weight, 1.0 / self.count)
        self.value = x if self.value is None else self.value + share * (x - self.value)
        return self.value


class Progress:
    """Counts steps start+1..total as they complete, on a tqdm bar (off with `disable`).

    `clock` is the wall clock (seconds); tests hand in a fake one.
    """

    def __init__(
        self,
        start: int,
        total: int,
        *,
        disable: bool = False,
        ahead: int = AHEAD,
        weight: float = 0.05,
        clock=time.perf_counter,
    ):
        self.clock, self.ahead = clock, ahead
        self.start, self.total, self.done = start, total, start
        self.began = self.last = clock()  # `last`: when the newest counted step completed
        self.paused_s = 0.0  # recurring time outside the steps
        self.one_off_s = None  # within `paused`: the block's one-off seconds so far
        self.step_s, self.tokens, self.loss = (Smoothed(weight) for _ in range(3))
        self.queue: collections.deque = collections.deque()  # (loss, tokens) not yet counted
        self.bar = tqdm(
            total=total,
            initial=start,
            desc="train",
            bar_format=BAR_FORMAT,
            dynamic_ncols=True,
            disable=disable,
        )

    def dispatched(self, loss, tokens: int) -> None:
        """The next step was dispatched: its loss (a scalar jax.Array, not yet read) and the
        tokens of its batch. Counts the steps that are complete, and waits for those more
        than `ahead` behind it."""
        self.queue.append((loss, tokens))
        while self.queue and (len(self.queue) > self.ahead or self.queue[0][0].is_ready()):
            self._count(*self.queue.popleft())

    def wait(self) -> None:
        """Counts every dispatched step, waiting for the last one."""
        while self.queue:
            self._count(*self.queue.popleft())

    def _count(self, loss, tokens: int) -> None:
        loss = float(loss)  # waits for the step: it is complete from here on
        now = self.clock()
        self.step_s.add(now - self.last)
        self.last = now
        self.tokens.add(tokens)
        self.loss.add(loss)
        self.done += 1
        self.bar.set_postfix_str(self.postfix(), refresh=False)
        self.bar.update(1)

    @contextlib.contextmanager
    def paused(self):
        """A block outside the steps that recurs (evaluation, a checkpoint): its time is
        elapsed but not step time. The dispatched steps are counted first."""
        self.wait()
        began, self.one_off_s = self.clock(), 0.0
        try:
            yield
        finally:
            seconds = self.clock() - began
            self.paused_s += seconds - self.one_off_s
            self.last += seconds
            self.one_off_s = None

    def off_clock(self, seconds: float) -> None:
        """`seconds` of one-off work (compiling a new batch shape), between steps or within
        `paused`: elapsed, but neither step time nor expected again."""
        if self.one_off_s is None:
            self.last += seconds
        else:
            self.one_off_s += seconds

    def elapsed_s(self) -> float:
        return self.clock() - self.began

    def tokens_per_s(self) -> float | None:
        if self.step_s.value is None or self.step_s.value <= 0:
            return None
        return self.tokens.value / self.step_s.value

    def remaining_s(self) -> float | None:
        """The smoothed step time and the pauses per step so far, over the steps left (None
        before the first step completes)."""
        if self.step_s.value is None:
            return None
        per_step = self.step_s.value + self.paused_s / (self.done - self.start)
        return max(self.total - self.done, 0) * per_step

    def times(self) -> str:
        """'01:02 elapsed, 03:04 left' ('? left' before the first step completes)."""
        remaining = self.remaining_s()
        left = "?" if remaining is None else tqdm.format_interval(remaining)
        return f"{tqdm.format_interval(self.elapsed_s())} elapsed, {left} left"

    def postfix(self) -> str:
        """'loss 2.3456, 12,345 tok/s, 01:02 elapsed, 03:04 left' (smoothed)."""
        rate = self.tokens_per_s()
        rate = "?" if rate is None else f"{rate:,.0f}"
        return f"loss {self.loss.value:.4f}, {rate} tok/s, {self.times()}"

    def write(self, line: str) -> None:
        """Prints `line` above the bar (nothing where the bar is off)."""
        if not self.bar.disable:
            self.bar.write(line)

    def close(self) -> None:
        self.bar.close()
