"""Training with an attacker in the all-reduce: the honest peers' held-out loss with it vs without it.

Per step, every peer computes the gradient of its own copy of the tiny GPT-2 (same seed) on its own
shard of the bundled corpus; the gradients are averaged by real hivemind averagers over loopback,
matched and then triggered together (as in ``bench/allreduce.py``) so every round holds every
peer; each honest peer applies the result with ``ClippedAdamW``. The honest averagers
(``RobustAverager``, with the rule and bans of their own over the run's ``OffenceLog``) run
``RobustAllReduceRunner``; the attacker's averager is plain hivemind (a bare ``DecentralizedAverager``)
and sends, from its own honest gradient: NaN, x1e30, x(-3), or x(-1) with a declared weight of 1e30.
Baseline: the same honest peers, seeds and batches, without the attacker.

Reported per run: the honest peers' mean held-out loss on the validation split after ``--steps``
steps, its ratio to the baseline (goal: within 1.10), the rounds that failed, and who was named.
A last baseline runs the honest peers with hivemind's own mean: what the robust aggregation costs
in learning when nobody attacks.

Run: ``.venv/bin/python -m bench.attacked_training`` (about 10 minutes on 2 shared CPU cores).
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

import hivemind
import torch
from hivemind.averaging.control import AveragingStage

from bench.common import exit_on_sigterm, table, write_result
from hivetrain.aggregation import AggregationRule
from hivetrain.data import BUNDLED_DATASET, BlockStream, validation_blocks
from hivetrain.hivemind_compat import Bans, OffenceLog, RobustAverager, install_codecs
from hivetrain.log import get_logger
from hivetrain.models import build_model
from hivetrain.protocol.training import ClippedAdamW, param_groups
from hivetrain.tokenizer import load_tokenizer
from hivetrain.validator.evaluate import evaluate

logger = get_logger("bench.attacked_training")
BLOCK = 64  # the tiny preset's context
#: attack -> (what the attacker sends, made from its honest gradient; the weight it declares)
ATTACKS = {
    "none (plain hivemind)": None,  # the same honest peers with hivemind's own mean: what robustness costs
    "none": None,
    "NaN parts": (lambda grad: torch.full_like(grad, float("nan")), None),
    "1e30-scaled parts": (lambda grad: grad * 1e30, None),
    "weight 1e30 (flipped)": (lambda grad: -grad, 1e30),
    "sign-flipped (-3x)": (lambda grad: -3 * grad, None),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--honest", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps (= averaging rounds) per run")
    parser.add_argument("--batch", type=int, default=8, help="blocks of 64 tokens per peer per step")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-blocks", type=int, default=64)
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=list(ATTACKS))
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/attacked_training.json)")
    return parser.parse_args(argv)


@dataclass
class Peer:
    model: torch.nn.Module
    opt: ClippedAdamW | None  # None: the attacker does not care what it applies
    batches: object
    averager: hivemind.averaging.DecentralizedAverager | None = None

    def gradient(self) -> tuple[torch.Tensor, float]:
        """This peer's flat gradient on its next batch, and the batch's loss."""
        _, batch = next(self.batches)
        self.model.zero_grad(set_to_none=False)
        loss = self.model(input_ids=batch, labels=batch).loss
        loss.backward()
        return torch.cat([p.grad.reshape(-1) for p in self.model.parameters()]), float(loss.detach())

    def apply(self, flat: torch.Tensor) -> None:
        offset = 0
        for param in self.model.parameters():
            param.grad.copy_(flat[offset : offset + param.numel()].view_as(param))
            offset += param.numel()
        self.opt.step()


def make_peers(shards: range, batch: int, lr: float, tokenizer, attacker: bool) -> list[Peer]:
    peers = []
    for index in shards:
        model = build_model("tiny", seed=0)
        model.train()
        stream = BlockStream(BUNDLED_DATASET, "train", "text", tokenizer, BLOCK, num_shards=16, shard=index, seed=0)
        opt = None if attacker else ClippedAdamW(param_groups(model, 0.1), lr=lr, max_grad_norm=1.0)
        peers.append(Peer(model, opt, stream.batches(batch)))
    return peers


def averaging_round(
    peers: list[Peer], tensors: list[torch.Tensor], weights: list[float], timeout: float = 60.0
) -> bool:
    """Average ``tensors`` (in place) in one group of the peers that get one; False when the honest peers got none.

    ``peers[-1]`` is honest. A banned attacker finds no group with the honest peers (they refuse it in
    matchmaking): its request is cancelled once the honest peers are matched.
    """
    for peer, tensor in zip(peers, tensors):
        with peer.averager.get_tensors() as own:
            own[0].copy_(tensor)
    controls = [
        p.averager.step(wait=False, weight=w, require_trigger=True, timeout=timeout, allow_retries=False)
        for p, w in zip(peers, weights)
    ]
    honest = controls[-len([p for p in peers if p.opt is not None]) :]
    deadline = time.monotonic() + timeout
    while any(c.stage != AveragingStage.AWAITING_TRIGGER for c in honest):
        if time.monotonic() > deadline or any(c.done() for c in honest):
            for control in controls:
                control.cancel()
            return False
        time.sleep(0.01)
    time.sleep(0.05)  # an attacker matched into the same group reaches the trigger as well
    for control in controls:
        if control.stage == AveragingStage.AWAITING_TRIGGER:
            control.allow_allreduce()
        else:
            control.cancel()
    try:
        for control in honest:
            control.result(timeout=timeout)
    except Exception as error:  # a failed round: every peer applies its own gradient this step
        logger.warning(f"averaging round failed: {error!r}")
        return False
    for peer, tensor in zip(peers, tensors):
        if peer.opt is not None:
            with peer.averager.get_tensors() as own:
                tensor.copy_(own[0])
    return True


def run(dhts, attack: str, args, tokenizer, blocks: torch.Tensor) -> dict:
    honest = make_peers(range(args.honest), args.batch, args.lr, tokenizer, attacker=False)
    attacker = (
        make_peers(range(args.honest, args.honest + 1), args.batch, args.lr, tokenizer, attacker=True)
        if ATTACKS[attack]
        else []
    )
    numel = sum(p.numel() for p in honest[0].model.parameters())
    prefix = f"bench-attacked-{attack.split()[0].lower()}"
    everyone = attacker + honest  # the attacker first: DHT 0
    log = OffenceLog(ban_s=1e9)
    rule = AggregationRule(max_weight=4.0 * args.batch * len(everyone))
    for index, peer in enumerate(everyone):
        robust = peer.opt is not None and attack != "none (plain hivemind)"  # the attacker runs plain hivemind
        cls = RobustAverager if robust else hivemind.averaging.DecentralizedAverager
        options = dict(aggregation_rule=rule, bans=Bans(log)) if robust else {}
        peer.averager = cls(
            [torch.zeros(numel)],
            dhts[index],
            prefix=prefix,
            target_group_size=len(everyone),
            min_group_size=len(honest),
            min_matchmaking_time=1.0,
            request_timeout=0.5,
            allreduce_timeout=60,
            start=True,
            **options,
        )
    failed, named, started = 0, {}, time.perf_counter()
    try:
        for step in range(args.steps):
            grads, losses = zip(*(peer.gradient() for peer in everyone))
            grads, weights = list(grads), [float(args.batch)] * len(everyone)
            if attacker:
                poison, weight = ATTACKS[attack]
                grads[0] = poison(grads[0])
                weights[0] = weight or weights[0]
            local = [g.clone() for g in grads]
            if not averaging_round(everyone, grads, weights):
                failed += 1
                grads = local
            for peer, grad in zip(honest, grads[len(attacker) :]):
                peer.apply(grad)
            named.update({(o.peer_id, o.role): o.reason for o in log.drain()})
            if step % 10 == 0:
                logger.info(
                    f"{attack}: step {step}, honest train loss {sum(losses[len(attacker) :]) / len(honest):.3f}"
                )
    finally:
        for peer in everyone:
            peer.averager.shutdown()
    time.sleep(0.5)
    named.update({(o.peer_id, o.role): o.reason for o in log.drain()})
    attacker_id = dhts[0].peer_id.to_base58() if attacker else None
    held_out = [evaluate(peer.model.eval(), blocks, batch_size=8)[0] for peer in honest]
    return {
        "attack": attack,
        "held_out_loss": sum(held_out) / len(held_out),
        "worst_held_out_loss": max(held_out),
        "finite": all(math.isfinite(x) for x in held_out),
        "failed_rounds": failed,
        "steps": args.steps,
        "attacker_named_as": sorted(role for peer, role in named if peer == attacker_id),
        "honest_named": sorted(
            f"{peer} as {role}: {why}" for (peer, role), why in named.items() if peer != attacker_id
        ),
        "seconds": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    exit_on_sigterm()
    install_codecs()
    torch.manual_seed(0)
    tokenizer = load_tokenizer()
    blocks = validation_blocks(tokenizer, BLOCK, args.eval_blocks)
    dhts = [hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])]
    try:
        for _ in range(args.honest):
            dhts.append(
                hivemind.DHT(
                    start=True,
                    host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                    initial_peers=[str(a) for a in dhts[0].get_visible_maddrs()],
                )
            )
        runs = []
        for attack in args.attacks:
            # without an attacker the honest peers use DHTs 0..n-1; with one, it takes DHT 0
            runs.append(run(dhts if ATTACKS[attack] else dhts[: args.honest], attack, args, tokenizer, blocks))
            logger.info(f"{runs[-1]}")
    finally:
        for dht in dhts:
            dht.shutdown()
    baseline = next((r["held_out_loss"] for r in runs if r["attack"] == "none"), None)
    for result in runs:
        result["vs_baseline"] = result["held_out_loss"] / baseline if baseline else None
    print(
        table(
            [
                "attacker (1 of %d peers)" % (args.honest + 1),
                "honest held-out loss",
                "vs no attacker",
                "failed rounds",
                "attacker named as",
                "honest peers named",
            ],
            [
                [
                    r["attack"],
                    r["held_out_loss"],
                    r["vs_baseline"],
                    f"{r['failed_rounds']}/{r['steps']}",
                    ", ".join(r["attacker_named_as"]) or "-",
                    len(r["honest_named"]),
                ]
                for r in runs
            ],
        )
    )
    path = write_result("attacked_training", {"args": vars(args), "runs": runs}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
