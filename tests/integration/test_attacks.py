"""Real swarms with attackers in the all-reduce: 3 honest miners, the validator, and 2 poisoning miners
(gradient averaging, and DiLoCo, where they poison the pseudo-gradients).

The attackers (tests/integration/cheaters.py) run plain hivemind. Per swarm, each attacker kind
must be named in signed telemetry, in the role it attacked from (None: either) and for the reason
expected, except a flip of honest size, which is clipped and not named (README, Threats); no
honest peer may be named; the honest miners must keep finite parameters and keep learning, and the
validator's model must stay finite and its held-out loss fall. Poisoned state and forged progress:
test_state_attacks.py.
"""

from __future__ import annotations

import pytest
from attack_helpers import assert_no_honest_peer_named, assert_training_survives, attacked_swarm, peer_ids, wait_named

pytestmark = pytest.mark.integration

HONEST = 3
#: per swarm: attacker kind -> (the role it must be named in, None for any; a phrase of the reason), or None
SWARMS = {
    "nan+weight": {"nan": (None, "NaN"), "weight": ("sender", "declared the weight")},
    "scaled+flip": {"scaled": (None, ""), "flip": None},
    "diloco-nan+weight": {"nan": (None, "NaN"), "weight": ("sender", "declared the weight")},  # poisoned Δ
}
#: swarms named diloco-* train in DiLoCo mode: the attackers poison the pseudo-gradients they send
DILOCO = {"HIVE_MODE": "diloco", "HIVE_INNER_STEPS": "10", "HIVE_BATCH_SIZE": "4", "HIVE_LR": "0.001"}


@pytest.fixture(scope="module", params=sorted(SWARMS))
def attacked(request, tmp_path_factory):
    attackers = SWARMS[request.param]
    workdir = tmp_path_factory.mktemp(request.param.replace("+", "-"))
    env = DILOCO if request.param.startswith("diloco-") else None
    with attacked_swarm(workdir, "atest", HONEST, list(attackers), env) as swarm:
        yield swarm, attackers


def test_the_attackers_are_named_and_no_honest_peer_is(attacked):
    swarm, attackers = attacked
    honest = set(peer_ids(swarm.miners[:HONEST]))
    for kind, attacker in zip(attackers, peer_ids(swarm.miners[HONEST:])):
        if attackers[kind] is None:
            continue
        role, phrase = attackers[kind]
        caught = wait_named(swarm, attacker, role)
        assert {o.peer_id for o in caught} <= honest, caught
        assert any(phrase in o.reason for o in caught), (kind, caught)
    assert_no_honest_peer_named(swarm, honest)


def test_the_honest_miners_and_the_validator_keep_learning(attacked):
    swarm, _ = attacked
    assert_training_survives(swarm, HONEST)
