"""When downloaded training states agree: the rule by which a joiner or the validator adopts one.

A state is adopted when two voters (admitted hotkeys; peer ids under open admission) serve states whose
parameters agree within ``AGREE_TOL`` (``state_distance``) at epochs at most ``AGREE_EPOCHS`` apart; the
newer of the two is taken. A server's priority is only the order candidates are asked in.

Honest peers' parameters are close but not bit-identical (a peer whose round failed stepped with its own
gradient; a peer one epoch behind lacks one step), so parameters are compared with a tolerance, per tensor:
the root mean square of the difference over the larger root mean square of the two tensors, at least
``SCALE_FLOOR`` (a tensor near zero, a bias, moves by about the learning rate per step whatever its size),
and the largest over the tensors (a state that replaced one layer disagrees as much as one that replaced all;
LayerNorm weights of 1 do not dilute it). Calibrated with ``bench/state_agreement.py`` on the tiny preset
(figures in its docstring).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

#: The least per-coordinate scale a tensor is measured against: below GPT-2's initial standard deviation
#: (the presets' initializer_range is 0.05; the residual projections start at 0.025), above a bias's few steps.
SCALE_FLOOR = 0.02
#: Two states agree when no parameter tensor differs by more than this (``state_distance``).
AGREE_TOL = 0.15
#: A state this far from both agreeing states, at the epoch of one of them, names its server: nearer than a
#: random init of another seed (1.41) or one replaced layer (1.41). Not lower: honest peers at one epoch can be
#: far apart where they train apart (a DiLoCo peer whose outer round failed applied its own outer step: one
#: outer step of one peer moves a state by 0.27-0.63 at 10 inner steps, 0.92-0.97 at 50; use_local_updates
#: peers 20 steps apart: up to 0.27). A state between the two bounds (+0.5σ noise: 0.45) is neither adopted
#: nor named.
NAME_TOL = 1.2
#: Two states agree only at epochs at most this far apart.
AGREE_EPOCHS = 1
#: The most valid states a download holds while it looks for agreement (each is parameters and two AdamW
#: statistics): past it the oldest is dropped, so two honest servers asked after a few liars still meet.
MAX_HELD_STATES = 4


def _rms(tensor: torch.Tensor) -> float:
    return tensor.pow(2).mean().sqrt().item() if tensor.numel() else 0.0


def state_distance(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    """The largest, over paired tensors, of rms(a - b) / max(rms(a), rms(b), ``SCALE_FLOOR``)."""
    worst = 0.0
    for x, y in zip(a, b):
        x, y = x.detach().float(), y.detach().float()
        worst = max(worst, _rms(x - y) / max(_rms(x), _rms(y), SCALE_FLOOR))
    return worst if math.isfinite(worst) else math.inf


@dataclass
class Candidate:
    """One valid downloaded state: who served it (its peer id and voter) and what (metadata, tensors)."""

    peer: str
    voter: str
    state: tuple
    params: list[torch.Tensor] = field(repr=False)  # the tensors compared: the first len(local) of the state

    @property
    def epoch(self) -> int:
        return self.state[0]["epoch"]


class Agreement:
    """The valid states downloaded so far, at most one per voter, and whether two of them agree.

    ``add`` returns the state to adopt as soon as two voters agree; ``dissenters`` names the held states of
    other voters at the adopted state's epoch (or its partner's) that disagree with it; ``alone`` is the
    state of the only voter that served one, when exactly one did.
    """

    def __init__(self, tol: float = AGREE_TOL, epochs: int = AGREE_EPOCHS, max_held: int = MAX_HELD_STATES):
        if not max_held >= 2:
            raise ValueError(f"max_held must be >= 2 (agreement needs two states), got {max_held}")
        self.tol, self.epochs, self.max_held = tol, epochs, max_held
        self.held: list[Candidate] = []
        self.voters: set[str] = set()  # every voter that served a valid state, held or dropped
        self._last: Candidate | None = None

    def has(self, voter: str) -> bool:
        """Whether ``voter`` already served a valid state (one hotkey, one vote: its other peer ids are not asked)."""
        return voter in self.voters

    def add(self, candidate: Candidate) -> tuple[Candidate, Candidate, float] | None:
        """Hold ``candidate``; (the state to adopt, the one it agrees with, their distance) when two voters agree."""
        if candidate.voter in self.voters:
            raise ValueError(f"{candidate.voter} already served a state: one voter, one state")
        self.voters.add(candidate.voter)
        self._last = candidate
        for other in self.held:
            if abs(other.epoch - candidate.epoch) > self.epochs:
                continue
            distance = state_distance(other.params, candidate.params)
            if distance <= self.tol:
                newer = candidate if candidate.epoch > other.epoch else other
                return newer, (other if newer is candidate else candidate), distance
        self.held.append(candidate)
        if len(self.held) > self.max_held:
            self.held.pop(0)
        return None

    def dissenters(self, adopted: Candidate, partner: Candidate) -> list[tuple[Candidate, float]]:
        """Held states of other voters, at the epoch of ``adopted`` or ``partner``, farther than ``NAME_TOL`` from
        both."""
        found = []
        for other in self.held:
            if other.voter in (adopted.voter, partner.voter) or other.epoch not in (adopted.epoch, partner.epoch):
                continue
            distance = min(state_distance(other.params, adopted.params), state_distance(other.params, partner.params))
            if distance > NAME_TOL:
                found.append((other, distance))
        return found

    @property
    def alone(self) -> Candidate | None:
        """The state of the one voter that served a valid state, when exactly one did (unconfirmed)."""
        return self._last if len(self.voters) == 1 else None
