"""Robust aggregation in the all-reduce: what it costs per round, and what it stops.

**Cost.** Two groups of ``--peers`` hivemind averagers over ``--numel`` float32 each (the tiny
GPT-2's size by default), one with hivemind's own all-reduce and one with ``RobustAllReduceRunner``
(``RobustAverager`` with a rule), run rounds alternately (plain, robust, plain, ...) so both see the same
machine load; each round is matched first and then triggered on every peer at once (as in
``bench/allreduce.py``), so the time is the all-reduce alone. Reported: median round time of each
and their ratio.

**Attacks.** For each attack, one attacker (plain hivemind, a bare ``DecentralizedAverager``) and
``--peers - 1`` honest peers average once, with the honest peers plain and then
robust. Reported: the worst honest peer's cosine to the honest peers' mean, and its norm ratio
(1 = the mean's size).

Run: ``.venv/bin/python -m bench.robust_allreduce`` (about a minute on 2 shared CPU cores).
"""

from __future__ import annotations

import argparse

import hivemind
import torch

from bench.allreduce import reset, timed_round
from bench.common import exit_on_sigterm, spread, table, write_result
from hivetrain.aggregation import AggregationRule
from hivetrain.hivemind_compat import Bans, OffenceLog, RobustAverager, install_codecs
from hivetrain.log import get_logger
from hivetrain.protocol.admission import Admission

logger = get_logger("bench.robust_allreduce")
TINY_NUMEL = 3_340_288  # num_parameters(build_model("tiny"))
ATTACKS = {  # attacker's tensor from the honest signal, and the weight it declares
    "NaN parts": (lambda signal: torch.full_like(signal, float("nan")), 1.0),
    "1e30-scaled parts": (lambda signal: signal * 1e30, 1.0),
    "weight 1e30": (lambda signal: -signal, 1e30),
    "sign-flipped (-3x)": (lambda signal: -3 * signal, 1.0),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--numel", type=int, default=TINY_NUMEL, help="float32 elements each peer averages")
    parser.add_argument("--rounds", type=int, default=12, help="timed rounds of each kind")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/robust_allreduce.json)")
    parser.add_argument(
        "--admission",
        action="store_true",
        help="the robust averagers admit only the bench's peers, each with a hotkey of its own (HIVE_ADMISSION=chain)",
    )
    return parser.parse_args(argv)


def averagers(
    dhts,
    prefix: str,
    tensors: list[torch.Tensor],
    robust: bool,
    group: int,
    admission: Admission | None = None,
    **kwargs,
) -> list:
    """One averager per DHT over its tensor, with hivemind's all-reduce or the robust one (with ``admission``, if
    given); groups of ``group``."""
    if robust:  # bans of 0 s: the same peers meet every round
        kwargs.update(aggregation_rule=AggregationRule(), bans=Bans(OffenceLog(ban_s=0.0), admission))
    cls = RobustAverager if robust else hivemind.averaging.DecentralizedAverager
    return [
        cls(
            [tensor],
            dht,
            prefix=prefix,
            target_group_size=group,
            min_group_size=group,
            min_matchmaking_time=2.0,
            request_timeout=1.0,
            allreduce_timeout=300,
            start=True,
            **kwargs,
        )
        for dht, tensor in zip(dhts, tensors)
    ]


def measure_cost(dhts, numel: int, rounds: int, admission: Admission | None = None) -> dict:
    generator = torch.Generator().manual_seed(0)
    originals = [torch.randn(numel, generator=generator) for _ in dhts]
    groups = {
        kind: averagers(
            dhts, f"bench-robust-cost-{kind}", [t.clone() for t in originals], kind == "robust", len(dhts), admission
        )
        for kind in ("plain", "robust")
    }
    times: dict[str, list[float]] = {"plain": [], "robust": []}
    try:
        for index in range(rounds + 1):  # round 0 warms up connections and buffers
            for kind, group in groups.items():
                reset(group, originals)
                elapsed = timed_round(group)
                if index:
                    times[kind].append(elapsed)
            logger.info(f"round {index}: plain {times['plain'][-1:] or '-'} robust {times['robust'][-1:] or '-'}")
    finally:
        for group in groups.values():
            for averager in group:
                averager.shutdown()
    return {kind: spread(values) for kind, values in times.items()}


def attack_round(dhts, numel: int, attack: str, robust: bool, admission: Admission | None = None) -> dict:
    make, weight = ATTACKS[attack]
    generator = torch.Generator().manual_seed(1)
    signal = torch.randn(numel, generator=generator)
    honest = [signal + 0.3 * torch.randn(numel, generator=generator) for _ in dhts[1:]]
    prefix = f"bench-robust-{attack.split()[0]}-{robust}"
    attacker = averagers(dhts[:1], prefix, [make(signal)], False, len(dhts), part_size_bytes=2**16)
    mean = torch.stack(honest).mean(dim=0)
    # clones: an averager averages the tensors it is given in place
    group = averagers(
        dhts[1:], prefix, [t.clone() for t in honest], robust, len(dhts), admission, part_size_bytes=2**16
    )
    try:
        controls = [attacker[0].step(wait=False, weight=weight, timeout=120)]
        controls += [a.step(wait=False, weight=1.0, timeout=120) for a in group]
        for control in controls[1:]:
            gathered = control.result(timeout=150)
            if gathered is None or len(gathered) != len(dhts):
                raise RuntimeError(
                    f"{attack}: an honest peer averaged in a group of {len(gathered or ())}, not {len(dhts)}"
                )
        cosines, sizes = [], []
        for averager in group:
            with averager.get_tensors() as tensors:
                result = tensors[0]
                cosines.append(float(torch.nn.functional.cosine_similarity(result, mean, dim=0)))
                sizes.append(float(result.norm() / mean.norm()))
    finally:
        for averager in attacker + group:
            averager.shutdown()
    worst = min(range(len(cosines)), key=lambda i: cosines[i] if cosines[i] == cosines[i] else -2)
    return {"attack": attack, "robust": robust, "cosine": cosines[worst], "norm_ratio": sizes[worst]}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    exit_on_sigterm()
    install_codecs()
    dhts = [hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])]
    try:
        for _ in range(args.peers - 1):
            dhts.append(
                hivemind.DHT(
                    start=True,
                    host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                    initial_peers=[str(a) for a in dhts[0].get_visible_maddrs()],
                )
            )
        # every peer here, the attacker of the attack rounds too, is admitted, each with a hotkey of its own
        admission = (
            Admission.fixed({dht.peer_id.to_base58(): f"bench-hotkey-{i}" for i, dht in enumerate(dhts)})
            if args.admission
            else None
        )
        cost = measure_cost(dhts, args.numel, args.rounds, admission)
        attacks = [
            attack_round(dhts, min(args.numel, 400_000), attack, robust, admission)
            for attack in ATTACKS
            for robust in (False, True)
        ]
    finally:
        for dht in dhts:
            dht.shutdown()
    ratio = cost["robust"]["median"] / cost["plain"]["median"]
    print(
        table(
            ["all-reduce", "round s (median)", "round s [min, max]", "rounds"],
            [[kind, s["median"], f"[{s['min']:.2f}, {s['max']:.2f}]", s["n"]] for kind, s in cost.items()],
        )
    )
    robust = "robust with admission" if args.admission else "robust"
    print(f"{robust} / plain round time: {ratio:.2f} ({args.peers} peers, {args.numel:,} float32 each)\n")
    print(
        table(
            [
                "attack (1 of %d peers)" % args.peers,
                "aggregation",
                "worst honest cosine to the honest mean",
                "norm ratio",
            ],
            [
                [a["attack"], "robust" if a["robust"] else "plain hivemind", a["cosine"], a["norm_ratio"]]
                for a in attacks
            ],
        )
    )
    path = write_result(
        "robust_allreduce",
        {
            "peers": args.peers,
            "numel": args.numel,
            "rounds": args.rounds,
            "admission": args.admission,
            "cost": cost,
            "robust_over_plain": ratio,
            "attacks": attacks,
        },
        args.out,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
