"""DRIFT's trajectory return, as separate components that sum to the return.

    outcome     = gamma^(t*-1) if the trajectory is first solved at turn t*, else 0
                  (a recorded trajectory's outcome is its recorded reward: it has one turn, as given)
    format      = format_penalty x (turns with no parseable answer)         (format_penalty <= 0)
    repetition  = -lambda x (1 - distinct answers / answers)       (over the turns that gave an answer)
    return      = outcome + format + repetition

Discounting the turn of first success makes an answer that needed feedback worth less than a first-try
answer; the repetition term penalises repeating the same wrong answer after being told it is wrong."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ReturnConfig:
    """The return's constants (module doc): gamma discounts the turn of first success, format_penalty is
    added per unparseable turn, repetition_penalty is lambda. ValueError unless 0 < gamma <= 1."""

    gamma: float = 0.9
    format_penalty: float = -0.1
    repetition_penalty: float = 0.5

    def __post_init__(self):
        if not 0 < self.gamma <= 1:
            raise ValueError(f"gamma must be in (0, 1], got {self.gamma}")


@dataclass(frozen=True)
class Return:
    """One trajectory's return by component (module doc), and its turn of first success."""

    outcome: float
    format: float
    repetition: float
    t_star: int | None      # 1-based turn of first success, None if never solved

    @property
    def total(self) -> float:
        """The return R = outcome + format + repetition."""
        return self.outcome + self.format + self.repetition

    @property
    def success(self) -> bool:
        """Whether some turn was correct (`t_star` is set)."""
        return self.t_star is not None


def first_success(correct: list[bool]) -> int | None:
    """The 1-based turn of the first True in `correct` (one verdict per turn), None when there is none."""
    return next((t + 1 for t, ok in enumerate(correct) if ok), None)


def trajectory_return(correct: list[bool], parseable: list[bool], answers: list[str | None],
                      cfg: ReturnConfig, recorded: float | None = None) -> Return:
    """The return of one trajectory from its per-turn verdicts. `answers` are the normalised final
    answers, None where a turn had none (only given answers count towards repetition)."""
    t_star = first_success(correct)
    if recorded is not None:
        outcome = float(recorded)
    else:
        outcome = cfg.gamma ** (t_star - 1) if t_star is not None else 0.0
    fmt = cfg.format_penalty * sum(1 for p in parseable if not p)
    given = [a for a in answers if a is not None]   # a missing answer is the format penalty's business
    repetition = -cfg.repetition_penalty * (1.0 - len(set(given)) / len(given)) if given else 0.0
    return Return(outcome, fmt + 0.0, repetition + 0.0, t_star)   # + 0.0: no -0.0 in the columns
