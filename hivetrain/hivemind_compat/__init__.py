"""Every place hivetrain reaches into hivemind's internals, in one package.

hivemind 1.1.12 is pinned. What is here overrides private methods (``Optimizer._make_state_averager``,
``_make_gradient_averager``, ``_update_global_epoch``, ``_average_gradients_and_load_into_optimizer``,
the averager's ``_run_allreduce_inplace_`` and its ``_matchmaking`` attribute, the part reducer of the
all-reduce, matchmaking's admission checks, the state download), patches a codec table (the one
process-wide write: hivemind decodes through it), and reads log lines, so a new hivemind release can
break it silently. Importing this package checks the version and the hooks it relies on, and fails
at start with what to do instead of mid-training (tests/test_hivemind_compat.py also pins the
source of each method copied or overridden). Code outside this package imports hivemind's public
names it needs (``DHT``, ``PeerID``, ``Optimizer``) from here.
The README's "hivemind behaviours we work around" explains each piece:

* ``codecs``     the 8-bit codec under NumPy 2;
* ``state``      copies of our state for peers, verification of every state we download;
* ``optimizer``  averaging rounds reported (their groups and durations), state loads timed and
                 put off past an imminent epoch (the out-of-sync flip-flop), a straggler sitting out;
* ``uplink``     how long our own link took to send a round's bytes (the straggler's measure);
* ``allreduce``  robust aggregation in the butterfly all-reduce;
* ``averagers``  averagers that carry their own aggregation rule and bans (``RobustAveraging``);
* ``progress``   hivemind's progress records in the DHT, read as plain values;
* ``diloco``     DiLoCo on hivemind.Optimizer: its offloaded optimizer as the outer one, pseudo-gradients
                 in place of gradients;
* ``bans``       offenders (in the all-reduce, in state downloads) named and banned: ``Bans`` per averager,
                 an ``OffenceLog`` and the ``BanTable`` all its averagers share per owner;
* ``receipts``   whose parts the gradient averager received in each round, for the owner's telemetry.
"""

from __future__ import annotations

import hivemind
from hivemind import DHT, Optimizer
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.matchmaking import Matchmaking
from hivemind.averaging.partition import TensorPartContainer, TensorPartReducer
from hivemind.optim.grad_averager import GradientAverager
from hivemind.optim.progress_tracker import ProgressTracker
from hivemind.optim.state_averager import TrainingStateAverager
from hivemind.p2p import PeerID

#: The hivemind release these workarounds were written for and tested with.
HIVEMIND_VERSION = "1.1.12"

_HOOKS = {
    Optimizer: (
        "_make_state_averager",
        "_update_global_epoch",
        "_average_gradients_and_load_into_optimizer",
        "load_state_from_peers",
        "_tag_along_with_zero_weight",
        "_check_and_accumulate_gradients",
        "_make_progress_tracker",
        "_make_gradient_averager",
        "_maybe_schedule_gradient_averaging",
        "_maybe_schedule_state_averaging",
    ),
    GradientAverager: ("accumulate_grads_", "load_accumulators_into_averager_", "reset_accumulated_grads_"),
    ProgressTracker: ("_parse_swarm_progress_data",),
    TrainingStateAverager: ("_get_handle_name", "get_current_state", "load_state_from_peers"),
    DecentralizedAverager: (
        "load_state_from_peers",
        "_load_state_from_peers",
        "get_stub",
        "_run_allreduce_inplace_",
        "_run_internal",
        "_matchmaking",
        "_get_handle_name",
    ),
    TensorPartReducer: ("accumulate_part", "check_current_part_finished", "reset_accumulators", "on_sender_failed"),
    TensorPartContainer: (
        "register_processed_part",
        "get_raw_input_parts",
        "register_failed_reducer",
        "iterate_output_tensors",
    ),
    Matchmaking: ("_check_reasons_to_reject", "_request_join_group"),
}


def check_hivemind(version: str = hivemind.__version__) -> None:
    """Raise ``ImportError`` when hivemind is not the release these workarounds were written for."""
    if version != HIVEMIND_VERSION:
        raise ImportError(
            f"hivetrain's hivemind workarounds (hivetrain/hivemind_compat/) were written for hivemind "
            f"{HIVEMIND_VERSION}, found {version}: install hivemind=={HIVEMIND_VERSION} "
            "(requirements.txt), or re-check each override in that package against the new release"
        )
    missing = [
        f"{getattr(owner, '__name__', owner)}.{name}"
        for owner, names in _HOOKS.items()
        for name in names
        if not hasattr(owner, name) and name not in getattr(owner, "__annotations__", {})
    ]
    if missing:
        raise ImportError(f"hivemind {version} lacks {', '.join(missing)}, which hivetrain/hivemind_compat/ overrides")


check_hivemind()

# after the check: the modules below subclass hivemind's internals
from hivetrain.hivemind_compat.averagers import RobustAverager, RobustAveraging, RobustGradientAverager  # noqa: E402
from hivetrain.hivemind_compat.bans import DEFAULT_BAN_S, Bans, Offence, OffenceLog  # noqa: E402
from hivetrain.hivemind_compat.codecs import Uniform8Bit, install_codecs  # noqa: E402
from hivetrain.hivemind_compat.diloco import DiLoCoOptimizer  # noqa: E402
from hivetrain.hivemind_compat.optimizer import STATE_AVERAGER_LOGGER, RoundInfo, StateRoundLogHandler, TrackedOptimizer  # noqa: E402
from hivetrain.hivemind_compat.receipts import Receipt, ReceiptLog  # noqa: E402
from hivetrain.hivemind_compat.state import SafeStateAverager, StateRejected, check_downloaded_state, parameters_set_to  # noqa: E402

__all__ = [
    "DEFAULT_BAN_S",
    "DHT",
    "Bans",
    "DiLoCoOptimizer",
    "HIVEMIND_VERSION",
    "Offence",
    "OffenceLog",
    "Optimizer",
    "PeerID",
    "Receipt",
    "ReceiptLog",
    "RobustAverager",
    "RobustAveraging",
    "RobustGradientAverager",
    "RoundInfo",
    "STATE_AVERAGER_LOGGER",
    "SafeStateAverager",
    "StateRejected",
    "StateRoundLogHandler",
    "TrackedOptimizer",
    "Uniform8Bit",
    "check_downloaded_state",
    "check_hivemind",
    "install_codecs",
    "parameters_set_to",
]
