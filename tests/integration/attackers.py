"""Miners that attack the averaging itself, for tests/integration/test_attacks.py: real processes, plain hivemind.

``python tests/integration/attackers.py KIND`` with the usual ``HIVE_*`` miner environment (the
test sets ``HIVE_ROBUST_AGGREGATION=false``: an attacker runs hivemind's own all-reduce, so it also
reduces its partitions the plain way and returns whatever that gives):

* ``nan``: every gradient it contributes to the all-reduce is NaN;
* ``scaled``: every gradient it contributes is multiplied by 1e30.

They live in the tests, not in the package: the miner ships no switch to attack.
"""

from __future__ import annotations

import sys
import threading

import torch

from hivetrain.miner.train import Miner
from hivetrain.runtime import install_stop_handlers, reset_signal_handlers_in_children
from hivetrain.settings import MinerSettings, load_settings

POISON = {
    "nan": lambda grad: grad.fill_(float("nan")),
    "scaled": lambda grad: grad.mul_(1e30),
}


class PoisoningMiner(Miner):
    """Trains as usual, but poisons its gradients right before hivemind accumulates and sends them."""

    kind = "nan"

    def _make_optimizer(self) -> None:
        super()._make_optimizer()
        step, poison = self.opt.step, POISON[self.kind]

        def poisoned_step(*args, **kwargs):
            with torch.no_grad():
                for param in self.model.parameters():
                    if param.grad is not None:
                        poison(param.grad)
            return step(*args, **kwargs)

        self.opt.step = poisoned_step


def main() -> int:
    kind = sys.argv[1]
    settings = load_settings(MinerSettings, sys.argv[2:])
    stop = threading.Event()
    install_stop_handlers(stop)
    reset_signal_handlers_in_children()
    miner = PoisoningMiner(settings, stop)
    miner.kind = kind
    try:
        miner.setup()
        miner.train()
    finally:
        miner.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
