"""hivemind.Optimizer as the miner uses it: AdamW with decay groups, warmup, clipping, round tracking."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from hivetrain.aggregation import AggregationRule
from hivetrain.hivemind_compat import DHT, DiLoCoOptimizer, ReceiptLog, RoundInfo, TrackedOptimizer, install_codecs
from hivetrain.hivemind_compat.progress import identity_signing_key
from hivetrain.protocol.admission import Admission
from hivetrain.protocol.training import COMPRESSIONS, ClippedAdamW, OuterSGD, param_groups, state_download_compression
from hivetrain.settings import MinerSettings


def warmup_schedule(warmup_epochs: int) -> Callable[[int], float]:
    """LR multiplier per global epoch: linear from 1/(warmup+1) to 1, then constant."""

    def multiplier(epoch: int) -> float:
        return min(1.0, (epoch + 1) / (warmup_epochs + 1))

    return multiplier


def aggregation_rule(settings: MinerSettings) -> AggregationRule | None:
    """The rule the miner's averagers aggregate with; None when ``robust_aggregation`` is off."""
    if not settings.robust_aggregation:
        return None
    # a peer declares the samples it accumulated since the last round: never more than the whole
    # swarm's target (plus its last batch); 4x leaves room for a peer configured with a larger target
    per_round = (
        settings.inner_steps * settings.batch_size if settings.mode == "diloco" else settings.target_batch_size
    )  # DiLoCo: a peer trains inner_steps batches per outer step
    return AggregationRule(clip_factor=settings.clip_factor, max_weight=4.0 * (per_round + settings.batch_size))


def _progress_signing(settings: MinerSettings) -> dict:
    """The tracker's signing key: our DHT identity's, so our progress records speak for our peer id and validators
    credit them (``hivetrain.validator.progress.fetch_progress``); hivemind's own per-process key without one."""
    identity = Path(settings.identity_path) if settings.identity_path else None
    if identity is None or not identity.is_file():
        return {}
    return dict(private_key=identity_signing_key(identity.read_bytes()))


def make_optimizer(
    model: torch.nn.Module,
    dht: DHT,
    settings: MinerSettings,
    on_round: Callable[[RoundInfo], None] | None = None,
    on_state_loaded: Callable[[float], None] | None = None,
    admission: Admission | None = None,
) -> TrackedOptimizer:
    """hivemind.Optimizer over ``model`` configured from ``settings`` (DiLoCo's in diloco mode); averagers fork here.

    Its averagers aggregate with ``aggregation_rule`` (none: hivemind's mean); peers they catch are
    banned for ``ban_s`` (those serving a bad state whether or not aggregation is robust) and named
    in ``opt.offences``, with the peers whose progress records are implausible; whose parts its gradient
    averager received in each round goes to ``opt.receipts`` (robust aggregation only). ``admission`` (default
    open) keeps peers no admitted hotkey vouches for out of its groups, its downloads and its epoch.
    """
    install_codecs()
    # what both modes share: the swarm, the averagers' wire formats and timeouts, the reports
    common = dict(
        dht=dht,
        run_id=settings.run_id,
        batch_size_per_step=settings.batch_size,
        matchmaking_time=settings.matchmaking_time,
        averaging_timeout=settings.averaging_timeout,
        load_state_timeout=settings.load_state_timeout,
        average_state_every=settings.average_state_every,
        grad_compression=COMPRESSIONS[settings.grad_compression](),
        state_averaging_compression=COMPRESSIONS[settings.state_compression](),
        load_state_compression=state_download_compression(settings.state_compression),
        # request_timeout below min_matchmaking_time avoids hivemind's deadlock warning (and the deadlock)
        averager_opts=dict(
            request_timeout=min(3.0, settings.matchmaking_time / 2), bandwidth=settings.bandwidth or None
        ),
        client_mode=settings.client_mode,
        tracker_opts=dict(min_refresh_period=0.5, max_refresh_period=5.0, **_progress_signing(settings)),
        verbose=True,
        on_round=on_round,
        on_state_loaded=on_state_loaded,
        straggler_share=settings.straggler_share,
        aggregation_rule=aggregation_rule(settings),
        ban_s=settings.ban_s,
        admission=admission,
        # whose parts the gradient averager received, round by round: the evidence validators credit others by
        receipts=ReceiptLog(),
    )
    clip, lr, betas = settings.grad_clip, settings.lr, (0.9, 0.95)
    # fused: one kernel for all tensors; torch's default CPU AdamW loops tensor by tensor (9x slower, BENCHMARKS.md)
    adamw = lambda params: ClippedAdamW(params, max_grad_norm=clip, lr=lr, betas=betas, fused=True)  # noqa: E731
    if settings.mode == "diloco":
        outer_lr, momentum = settings.outer_lr, settings.outer_momentum
        # the inner warmup counts inner steps: a joiner's fresh AdamW warms up again
        warmup = warmup_schedule(settings.warmup_epochs * settings.inner_steps)
        return DiLoCoOptimizer(
            params=param_groups(model, 0.0),  # the outer groups: the same order a validator downloads (no decay)
            optimizer=lambda params: OuterSGD(params, lr=outer_lr, momentum=momentum),
            inner_params=param_groups(model, settings.weight_decay),
            inner_optimizer=adamw,
            inner_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, warmup),
            inner_steps=settings.inner_steps,
            # a parameter round after a split round (or a missed one) joins θ and the momentum that steps it
            average_opt_statistics=("momentum_buffer",) if momentum > 0 else (),
            **common,
        )
    return TrackedOptimizer(
        params=param_groups(model, settings.weight_decay),
        optimizer=adamw,
        scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, warmup_schedule(settings.warmup_epochs)),
        target_batch_size=settings.target_batch_size,
        delay_grad_averaging=settings.delay_grad_averaging,
        delay_optimizer_step=settings.delay_optimizer_step,
        offload_optimizer=settings.offload_optimizer,
        reuse_grad_buffers=settings.reuse_grad_buffers and not settings.use_local_updates,  # no accumulators there
        delay_state_averaging=settings.delay_state_averaging,
        use_local_updates=settings.use_local_updates,
        **common,
    )
