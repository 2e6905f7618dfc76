"""How long a step takes for how many tokens: ms = fixed_ms + ms_per_token * tokens, learned online.

Fed with the workers' own step times (`StepResult.step_time_s`, so the socket round trip and the
scheduler's own work are not in it) against the tokens each step computed (decodes and prefill
chunks alike). One scheduler serves one worker group, so the model is per device and dtype.

The fit is least squares with exponential forgetting (`decay` per step: recent steps count
most, so it follows a machine whose speed drifts). It needs steps that vary in size to tell the
fixed cost from the per-token one (`min_spread_tokens`, a weighted standard deviation) and a
fit increasing in tokens; when the recent steps do not give that (a long run of decode steps of
one batch size), the last full fit stands. Before any full fit the model is proportional (ms =
ms_per_token * tokens through the mean step): that overestimates bigger steps, so the budget it
gives errs small, and the steps it then allows vary in size and make the full fit possible. A
negative fitted fixed cost is clamped to 0, which again errs on the slow side.

Pure Python, no torch: it lives in the scheduler process.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Fit:
    """ms = fixed_ms + ms_per_token * tokens; `proportional`: fixed_ms is 0 by fallback."""

    fixed_ms: float
    ms_per_token: float
    proportional: bool

    def predict_ms(self, tokens: int) -> float:
        return self.fixed_ms + self.ms_per_token * tokens

    def tokens_within(self, ms: float) -> int:
        """The most tokens (>= 0) a step may compute and still take at most `ms`."""
        if ms <= self.fixed_ms:
            return 0
        return int((ms - self.fixed_ms) / self.ms_per_token)


class StepTimeModel:
    """Weighted sums of (tokens, ms) over the steps seen; `fit()` solves them."""

    def __init__(self, *, decay: float = 0.97, min_spread_tokens: float = 8.0) -> None:
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        self.decay = decay
        self.min_spread_tokens = min_spread_tokens
        self.steps = 0  # observed since start
        self._last_full: Fit | None = None
        self._w = self._x = self._y = self._xx = self._xy = 0.0

    def observe(self, tokens: int, ms: float) -> None:
        """One step of `tokens` tokens took `ms` milliseconds on the worker. Steps of no tokens
        and non-finite or negative times (a worker that reports none) are ignored."""
        if tokens <= 0 or not 0.0 <= ms < float("inf"):
            return
        d = self.decay
        self._w = self._w * d + 1.0
        self._x = self._x * d + tokens
        self._y = self._y * d + ms
        self._xx = self._xx * d + tokens * tokens
        self._xy = self._xy * d + tokens * ms
        self.steps += 1

    def fit(self) -> Fit | None:
        """The current model; None before any step was observed."""
        if self._w <= 0.0:
            return None
        mean_x, mean_y = self._x / self._w, self._y / self._w
        var_x = max(0.0, self._xx / self._w - mean_x * mean_x)
        if var_x >= self.min_spread_tokens ** 2:
            slope = (self._xy / self._w - mean_x * mean_y) / var_x
            if slope > 0.0:
                self._last_full = Fit(max(0.0, mean_y - slope * mean_x), slope, False)
                return self._last_full
        if self._last_full is not None:
            return self._last_full
        # Proportional through the mean step (mean_x >= 1: only steps with tokens are observed).
        return Fit(0.0, max(mean_y, 1e-6) / mean_x, True)

    def predict_ms(self, tokens: int) -> float | None:
        fit = self.fit()
        return None if fit is None else fit.predict_ms(tokens)
