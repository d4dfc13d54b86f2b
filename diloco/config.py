"""DiLoCoConfig: every knob of (Streaming) DiLoCo in one validated, frozen dataclass.

The keys match the `diloco:` section of a plan (`sync_every`, `fragments`, `pattern`,
`overlap_steps`, `alpha`, `quantization`), so `DiLoCoConfig(**plan["diloco"])` works.
A wrong value raises `ValueError` naming the field.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

Pattern = Literal["strided", "sequential"]
Quantization = Literal["fp4", "int8", "bf16"]

PATTERNS: tuple[str, ...] = ("strided", "sequential")
QUANTIZATIONS: tuple[str | None, ...] = ("fp4", "int8", "bf16", None)


@dataclass(frozen=True)
class DiLoCoConfig:
    """(Streaming) DiLoCo settings.

    sync_every: H, inner steps between two exchanges of the same fragment.
    fragments: P, parameter fragments synced in turn (fragment p starts at steps
        t with t % H == p * H // P); P = 1 is plain DiLoCo.
    pattern: "strided" puts layer i in fragment i % P; "sequential" puts contiguous
        runs of layers in one fragment.
    overlap_steps: tau, inner steps that run while a fragment's exchange is in flight.
    alpha: merge weight, theta <- alpha * theta_local + (1 - alpha) * theta_global.
    quantization: what crosses the wire: "fp4" (E2M1, per-block bf16 scales), "int8"
        (per-block bf16 scales), "bf16", or None (fp32, exact).
    outer_lr, outer_momentum, nesterov: the outer SGD.
    quant_block: elements per scale block for fp4 and int8.
    error_feedback: add each replica's quantization error of a fragment's last payload
        to that fragment's next pseudo-gradient (costs one fp32 copy of the parameters).
    timeout_s: how long a replica waits for an exchange before failing.
    start_timeout_s: how long a replica waits for the others at the initial broadcast.
        Replicas start at different times (interpreter and torch start-up, a loaded
        host), so the first meeting gets its own, longer bound than an exchange.
    broadcast_initial: copy group rank 0's parameters to every replica at start.
    """

    sync_every: int = 100
    fragments: int = 1
    pattern: Pattern = "strided"
    overlap_steps: int = 0
    alpha: float = 0.0
    quantization: Quantization | None = None
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    nesterov: bool = True
    quant_block: int = 32
    error_feedback: bool = False
    timeout_s: float = 300.0
    start_timeout_s: float = 600.0
    broadcast_initial: bool = True

    def __post_init__(self) -> None:
        problems = self._problems()
        if problems:
            raise ValueError("DiLoCoConfig: " + "; ".join(problems))

    def _problems(self) -> list[str]:
        problems = []
        if self.sync_every < 1:
            problems.append(f"sync_every must be >= 1, got {self.sync_every}")
        if not 1 <= self.fragments <= max(self.sync_every, 1):
            problems.append(f"fragments must be in [1, sync_every], got {self.fragments}")
        if self.pattern not in PATTERNS:
            problems.append(f"pattern must be one of {PATTERNS}, got {self.pattern!r}")
        if not 0 <= self.overlap_steps < self.sync_every:
            problems.append(f"overlap_steps must be in [0, sync_every), got {self.overlap_steps}")
        if not 0.0 <= self.alpha <= 1.0:
            problems.append(f"alpha must be in [0, 1], got {self.alpha}")
        if self.quantization not in QUANTIZATIONS:
            problems.append(
                f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}"
            )
        if self.outer_lr <= 0 or not 0.0 <= self.outer_momentum < 1.0:
            problems.append("outer_lr must be > 0 and outer_momentum in [0, 1)")
        if self.quant_block < 2 or self.quant_block % 2:
            problems.append(f"quant_block must be even and >= 2, got {self.quant_block}")
        if self.timeout_s <= 0 or self.start_timeout_s <= 0:
            problems.append(f"timeout_s and start_timeout_s must be > 0, got "
                            f"{self.timeout_s} and {self.start_timeout_s}")
        return problems

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
