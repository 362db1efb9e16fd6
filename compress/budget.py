"""The accuracy budget a quantized export must meet against its FP32 export (torch-free).

A `Budget` bounds what quantization may cost, measured on the validation ("eval") split against
the FP32 export run by the same runtime code:

- `max_dice_drop`: 1 - mean Dice of the quantized pipeline's first mask against the FP32
  pipeline's first mask, over the split's segmentation records (the FP32 masks score 1.0 by
  definition, so this is the Dice the quantization loses against its own reference);
- `min_token_agreement`: mean `metrics.token_agreement` of the greedy tokens against FP32;
- `min_sqnr_db` (optional): the lowest SQNR any quantized graph's outputs may have against the
  FP32 graph on the recorded inputs of the split.

`parse_budget("dice=1,tokens=99,sqnr=20")` reads the CLI form: Dice drop in points (percent of
Dice), token agreement in percent, SQNR in dB.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from typing import Any

BUDGET_VERSION = 1


@dataclass(frozen=True)
class Budget:
    """How much accuracy quantization may cost against FP32 (see the module docstring)."""

    max_dice_drop: float = 0.01
    min_token_agreement: float = 0.99
    min_sqnr_db: float | None = None
    version: int = BUDGET_VERSION

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_dice_drop <= 1.0:
            raise ValueError(f"max_dice_drop must lie in [0, 1], got {self.max_dice_drop}")
        if not 0.0 <= self.min_token_agreement <= 1.0:
            raise ValueError(
                f"min_token_agreement must lie in [0, 1], got {self.min_token_agreement}"
            )
        if self.min_sqnr_db is not None and not math.isfinite(self.min_sqnr_db):
            raise ValueError(f"min_sqnr_db must be finite, got {self.min_sqnr_db}")
        if self.version != BUDGET_VERSION:
            raise ValueError(f"budget version {self.version} is not {BUDGET_VERSION}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        text = f"dice={self.max_dice_drop * 100:g},tokens={self.min_token_agreement * 100:g}"
        if self.min_sqnr_db is not None:
            text += f",sqnr={self.min_sqnr_db:g}"
        return text


DEFAULT_BUDGET = Budget()
# Recipes whose LLM weights are 4-bit: 90 % token agreement, the same 1-point Dice drop. 4-bit
# weights of a small LLM change more of its greedy tokens than 8-bit ones: on the 3 M-parameter
# demo model (hidden 128, so one scale per 128-weight row) the CPU int8-w4 recipe keeps 0.963 of
# the FP32 tokens and the TensorRT fp16-w4 graphs 0.925 (measured 2026-12-02, eval split, 180
# answers) while 8-bit recipes keep >= 0.99. The floor still refuses a broken INT4 export
# (random-looking tokens agree < 0.6), and every build records the agreement it measured. A
# model trained on the INT4 grid (`TrainConfig.fake_int4_block`, the demo's stages 9-10) keeps
# 0.996 under fp16-w4 (LLM SQNR 128 dB against its own float graph): the floor is for the
# float-trained checkpoints users bring.
INT4_LLM_BUDGET = Budget(min_token_agreement=0.90)


def default_budget(llm_precision: str) -> Budget:
    """The budget a recipe gets when none is given: `INT4_LLM_BUDGET` for a 4-bit LLM."""
    return INT4_LLM_BUDGET if llm_precision == "int4" else DEFAULT_BUDGET


# CLI key -> (Budget field, factor from the CLI unit to the field's unit).
_KEYS = {
    "dice": ("max_dice_drop", 0.01),  # points of Dice (1 = 0.01)
    "tokens": ("min_token_agreement", 0.01),  # percent agreement (99 = 0.99)
    "sqnr": ("min_sqnr_db", 1.0),  # dB
}


def parse_budget(text: str, base: Budget = DEFAULT_BUDGET) -> Budget:
    """Read `"dice=1,tokens=99[,sqnr=20]"`; keys left out keep `base`'s values (the recipe's
    default budget, `default_budget`).

    `dice` is the allowed Dice drop in points (1 = 0.01), `tokens` the least token agreement in
    percent, `sqnr` the least SQNR of every quantized graph in dB. Raises ValueError naming the
    part it cannot read.
    """
    values: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        key, sep, raw = part.partition("=")
        key = key.strip().lower()
        if not sep or key not in _KEYS:
            raise ValueError(
                f"budget part {part!r}: expected key=value with key one of {', '.join(_KEYS)}, "
                "e.g. 'dice=1,tokens=99'"
            )
        try:
            number = float(raw)
        except ValueError:
            raise ValueError(f"budget part {part!r}: {raw!r} is not a number") from None
        name, factor = _KEYS[key]
        values[name] = number * factor
    if not values:
        raise ValueError(f"budget {text!r} names nothing; e.g. 'dice=1,tokens=99'")
    return dataclasses.replace(base, **values)


@dataclass(frozen=True)
class Measured:
    """What was measured on the validation split against FP32.

    `dice_drop` / `token_agreement` are None when the split holds no record they apply to, or
    when the quantized graphs cannot be run faithfully on this machine (`unmeasured_why`).
    `sqnr_db` maps each quantized graph to the lowest SQNR over its outputs.
    """

    dice_drop: float | None
    token_agreement: float | None
    sqnr_db: dict[str, float] = field(default_factory=dict)
    n_records: int = 0
    n_masks: int = 0
    unmeasured_why: str | None = None
    probe_dice_drop: float | None = None  # reported, not budgeted (`fidelity.PipelineFidelity`)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (an exact graph's infinite SQNR becomes the string "inf")."""
        d = asdict(self)
        d["sqnr_db"] = {
            k: (round(v, 3) if math.isfinite(v) else str(v)) for k, v in self.sqnr_db.items()
        }
        return d

    def violations(self, budget: Budget) -> list[str]:
        """One line per bound of `budget` these measurements break (empty: within budget)."""
        out = []
        if self.dice_drop is not None and self.dice_drop > budget.max_dice_drop + 1e-12:
            out.append(
                f"Dice drop {self.dice_drop:.4f} > {budget.max_dice_drop:.4f} "
                f"({self.n_masks} masks)"
            )
        agreement = self.token_agreement
        if agreement is not None and agreement < budget.min_token_agreement - 1e-12:
            out.append(
                f"token agreement {agreement:.4f} < {budget.min_token_agreement:.4f} "
                f"({self.n_records} answers)"
            )
        if budget.min_sqnr_db is not None:
            for graph, db in sorted(self.sqnr_db.items()):
                if db < budget.min_sqnr_db:
                    out.append(f"{graph} SQNR {db:.1f} dB < {budget.min_sqnr_db:.1f} dB")
        return out

    def broken_bounds(self, budget: Budget) -> Budget:
        """`budget` with every bound these measurements hold relaxed away: the excess of a
        graph against it says how much that graph causes of what is actually violated."""
        dice_broken = self.dice_drop is not None and self.dice_drop > budget.max_dice_drop
        tokens = self.token_agreement
        tokens_broken = tokens is not None and tokens < budget.min_token_agreement
        sqnr = budget.min_sqnr_db
        sqnr_broken = sqnr is not None and any(db < sqnr for db in self.sqnr_db.values())
        return dataclasses.replace(
            budget,
            max_dice_drop=budget.max_dice_drop if dice_broken else 1.0,
            min_token_agreement=budget.min_token_agreement if tokens_broken else 0.0,
            min_sqnr_db=sqnr if sqnr_broken else None,
        )

    def excess(self, budget: Budget) -> float:
        """How far over budget, as the largest bound's ratio (<= 0: within budget).

        Used to compare graphs when attributing a violation: 0.5 means the worst bound is broken
        by half its allowance.
        """
        ratios = [0.0]
        if self.dice_drop is not None:
            ratios.append(_over(self.dice_drop, budget.max_dice_drop))
        if self.token_agreement is not None:
            ratios.append(_over(1.0 - self.token_agreement, 1.0 - budget.min_token_agreement))
        if budget.min_sqnr_db is not None and self.sqnr_db:
            worst = min(self.sqnr_db.values())
            ratios.append((budget.min_sqnr_db - worst) / max(abs(budget.min_sqnr_db), 1.0))
        return max(ratios)


def _over(cost: float, allowance: float) -> float:
    """(cost - allowance) / allowance, with a zero allowance counted as 1e-3."""
    return (cost - allowance) / max(allowance, 1e-3)


class BudgetNotMetError(RuntimeError):
    """The quantized export misses the accuracy budget even after the sensitivity search.

    Carries the budget, the final measurements and the nodes already returned to float, so the
    caller can report them; nothing is written to the output folder.
    """

    def __init__(
        self,
        message: str,
        budget: Budget,
        measured: Measured,
        excluded: dict[str, list[str]] | None = None,
    ):
        super().__init__(message)
        self.budget = budget
        self.measured = measured
        self.excluded = excluded or {}


class BudgetNotMeasurableError(RuntimeError):
    """A budget was asked for graphs whose accuracy cannot be measured faithfully here.

    ONNX Runtime on the CPU cannot run TensorRT's FP8 / INT4 Q/DQ graphs (or runs FP8 wrongly
    with graph optimizations on); their accuracy must be measured on the target with engines.
    """
