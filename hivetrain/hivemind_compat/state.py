"""The training state: copies handed to peers, and verification of what is downloaded from them.

A downloaded state is adopted when it passes ``check_downloaded_state`` and two voters (hotkeys) agree on it
(``hivetrain.hivemind_compat.agreement``), never because its server declared the highest priority.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from typing import Callable, Iterator, Sequence

import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.compression import deserialize_torch_tensor
from hivemind.optim.state_averager import TrainingStateAverager
from hivemind.p2p import PeerID, ServicerBase
from hivemind.proto import averaging_pb2
from hivemind.utils import MPFuture, ValueWithExpiration
from hivemind.utils.asyncio import aiter_with_timeout
from hivemind.utils.streaming import combine_from_streaming

from hivetrain.hivemind_compat.agreement import NAME_TOL, Agreement, Candidate
from hivetrain.hivemind_compat.averagers import RobustAveraging
from hivetrain.hivemind_compat.bans import Bans
from hivetrain.hivemind_compat.pins import follows
from hivetrain.log import get_logger

logger = get_logger(__name__)


class StateRejected(ValueError):
    """A state downloaded from a peer that must not be adopted; the message says why."""


def check_downloaded_state(metadata, tensors, local: list[torch.Tensor], max_epoch: int | None) -> None:
    """Raise ``StateRejected`` unless a downloaded (metadata, tensors) may replace ``local`` parameters.

    hivemind checks only that the epoch is not behind ours. Refused here: a non-integer or negative
    epoch, one above ``max_epoch`` (what the swarm's progress supports), fewer tensors than our
    parameters, a parameter of another shape or dtype, and any NaN or infinity in any tensor
    (parameters or optimizer statistics).
    """
    epoch = metadata.get("epoch") if isinstance(metadata, dict) else None
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
        raise StateRejected(f"its epoch is {epoch!r}, not a non-negative integer")
    if max_epoch is not None and epoch > max_epoch:
        raise StateRejected(f"it claims epoch {epoch}, beyond the {max_epoch} the swarm's progress supports")
    if len(tensors) < len(local):
        raise StateRejected(f"it holds {len(tensors)} tensors, fewer than our {len(local)} parameters")
    for index, (mine, theirs) in enumerate(zip(local, tensors)):
        if not isinstance(theirs, torch.Tensor) or theirs.shape != mine.shape or theirs.dtype != mine.dtype:
            got = (tuple(theirs.shape), theirs.dtype) if isinstance(theirs, torch.Tensor) else type(theirs).__name__
            raise StateRejected(f"parameter {index} is {got}, ours is {(tuple(mine.shape), mine.dtype)}")
    for index, tensor in enumerate(tensors):
        if not isinstance(tensor, torch.Tensor) or not torch.isfinite(tensor).all():
            raise StateRejected(f"tensor {index} is not a finite tensor")


@contextlib.contextmanager
def parameters_set_to(params: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> Iterator[None]:
    """Run a block with ``params`` holding ``values`` (copied in), then put their own values back, whatever happens."""
    own = [param.detach().clone() for param in params]
    try:
        with torch.no_grad():
            for param, value in zip(params, values):
                param.copy_(value)
        yield
    finally:
        with torch.no_grad():
            for param, saved in zip(params, own):
                param.copy_(saved)


#: One server may take at most this share of a download's whole wait before it is cut off and named: a server
#: that drips a message just inside the per-message timeout held every sync for its whole timeout, and was
#: asked first again at the next one (priority 1e9), so the validator's model stopped moving. The rest is
#: left for the next candidates: a third, so that one dripping server leaves time for the two downloads an
#: agreement needs.
CANDIDATE_SHARE = 1 / 3
#: A server's deadline when the caller waits without a timeout.
MAX_CANDIDATE_S = 600.0


def _state_bytes_bound(local: list[torch.Tensor]) -> int:
    """The most bytes a peer may stream as its state: parameters, two AdamW statistics each, and slack."""
    return 4 * sum(t.numel() * t.element_size() for t in local) + 2**20


class _VerifiedDownload(DecentralizedAverager):
    """Sits between TrainingStateAverager and DecentralizedAverager in the MRO and replaces hivemind's download.

    hivemind asks the peer with the highest self-declared priority and adopts whatever it sends: a
    plausible wrong state (finite, the right shapes, a current epoch: another seed's random init) served at
    priority 1e9 was adopted at once. Here (in the averager's child process) the priority is only the order of
    asking. Each candidate is checked with ``check_downloaded_state`` (and must not stream more than
    ``_state_bytes_bound``); a candidate that fails is named and banned (``self.bans``, role "state") and the
    next one is asked, and so is one still streaming after ``CANDIDATE_SHARE`` of the caller's timeout (a
    server dripping its state). Refused peers (banned, not admitted) are never asked, nor a second peer id of
    a voter (``self.bans.voter``: its hotkey) that already served a valid state.

    A valid state is adopted when the swarm agrees with it (``agreement.Agreement``): as soon as two voters
    serve states whose parameters agree within ``AGREE_TOL`` at epochs at most one apart, the newer of the two
    comes back to the parent, which checks it once more; servers of states far from both (``NAME_TOL``) at
    their epoch are named and banned. Asking stops there, or when the caller's timeout is spent.

    What still lands: when exactly one voter served a valid state (a one-server swarm, or every other
    candidate failed), it is adopted, logged as unconfirmed; a liar that is the only server a joiner reaches
    is believed. A state within ``AGREE_TOL`` of an honest one (a small perturbation) may be adopted if its
    server claims the newer epoch. When voters serve states and no two agree, none is adopted and nobody is
    named (nobody can tell who lies): a liar beside one honest server stalls downloads until a second honest
    voter serves.
    """

    max_epoch: Callable[[], int | None] = staticmethod(lambda: None)
    bans: Bans  # set before the fork (RobustAveraging)
    rejected_states = 0  # downloads the parent refused (the child found them fine: the bound moved meanwhile)
    # of the last wait=True call: "none" (nobody sent an acceptable state), "behind" (the state's epoch is
    # behind ours: TrainingStateAverager quietly refuses it) or "verified" (taken up)
    last_download: str = "none"

    @follows(DecentralizedAverager, "load_state_from_peers", "973fae40a3d1e16f")
    @follows(TrainingStateAverager, "load_state_from_peers", "e4d647a9ea78cde8")  # it calls ours
    def load_state_from_peers(self, wait: bool = True, timeout: float | None = None):
        future = MPFuture()
        self._outer_pipe.send(
            ("_load_state_from_peers", [], dict(timeout=timeout, future=future, max_epoch=self.max_epoch()))
        )
        if not wait:
            return future
        self.last_download = "none"
        loaded = future.result(timeout=timeout)
        if loaded is None:
            return None
        metadata, tensors = loaded
        try:
            check_downloaded_state(metadata, tensors, self._local_parameters(), self.max_epoch())
        except StateRejected as rejected:
            self.rejected_states += 1
            logger.warning(f"refusing the state downloaded from peers: {rejected}")
            return None
        ours = getattr(self, "local_epoch", None)  # a TrainingStateAverager's
        self.last_download = "behind" if ours is not None and metadata["epoch"] < ours else "verified"
        return loaded

    def _local_parameters(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    @follows(DecentralizedAverager, "_load_state_from_peers", "fe7b419d01ced5fe")  # copied below
    async def _load_state_from_peers(
        self, future: MPFuture, timeout: float | None = None, max_epoch: int | None = None
    ):
        # DecentralizedAverager._load_state_from_peers (hivemind 1.1.12): each candidate verified, given a deadline
        # (a share of the caller's wait), and a state adopted only when two voters agree on it (or one alone serves)
        started = time.monotonic()
        total_s = MAX_CANDIDATE_S if timeout is None else timeout  # the caller stops waiting then
        deadline_s = MAX_CANDIDATE_S if timeout is None else max(1.0, CANDIDATE_SHARE * timeout)
        if timeout is not None:
            timeout = self.next_chunk_timeout if self.next_chunk_timeout is not None else self.request_timeout
        try:
            local = self._local_parameters()
            max_bytes = _state_bytes_bound(local)
            candidates = self._state_candidates()
            agreement = Agreement()
            for peer in candidates:
                peer_id, left_s = peer.to_base58(), total_s - (time.monotonic() - started)
                if left_s <= 0:
                    logger.info(f"the caller's {total_s:.0f}s are over: no more state servers asked")
                    break
                if self.bans.refuses(peer_id, f"{self.prefix} state download"):
                    continue  # never asked: neither banned peers nor peers no hotkey the chain admits vouches for
                voter = self.bans.voter(peer_id)
                if agreement.has(voter):
                    continue  # one hotkey, one vote: its other peer ids are not asked
                loaded = await self._checked_download(peer, timeout, max_bytes, deadline_s, left_s, local, max_epoch)
                if loaded is None:
                    continue
                logger.debug(f"checked the state from {peer}: epoch {loaded[0]['epoch']}")
                agreed = agreement.add(Candidate(peer_id, voter, loaded, loaded[1][: len(local)]))
                if agreed is not None:
                    self._name_dissenters(agreement, *agreed)
                    future.set_result(agreed[0].state)
                    return
            if (alone := agreement.alone) is not None:
                logger.warning(
                    f"verified the state from {alone.peer}: epoch {alone.epoch}, UNCONFIRMED: no other voter "
                    f"of {len(candidates)} candidates served a valid state to compare it with"
                )
                future.set_result(alone.state)
                return
            if agreement.voters:
                logger.warning(
                    f"{len(agreement.voters)} voters served valid states and no two agree: adopting none, naming "
                    f"none (nobody can tell who lies); epochs {sorted(c.epoch for c in agreement.held)}"
                )
            else:
                logger.info(f"no peer of {len(candidates)} sent a state we could adopt")
        finally:
            if not future.done():
                future.set_result(None)

    def _state_candidates(self) -> list[PeerID]:
        """The peers that declared a state-sharing priority, highest first: the order of asking, nothing more."""
        key = f"{self._matchmaking.group_key_manager.prefix}.all_averagers"
        priorities, _ = self.dht.get(key, latest=True) or ({}, None)
        if not isinstance(priorities, dict):
            priorities = {}
        candidates = {}
        for peer_id, info in priorities.items():
            try:
                peer = PeerID(peer_id)
            except Exception:  # a DHT subkey is whatever the writer chose
                continue
            if isinstance(info, ValueWithExpiration) and isinstance(info.value, (float, int)) and peer != self.peer_id:
                candidates[peer] = (float(info.value), random.random())  # random: the tie breaker
        return sorted(candidates, key=candidates.get, reverse=True)

    async def _checked_download(
        self, peer: PeerID, timeout, max_bytes: int, deadline_s: float, left_s: float, local, max_epoch
    ):
        """``peer``'s state if it passes ``check_downloaded_state`` within ``deadline_s``, else None (and its server
        named where it sent a state we refuse or was still streaming at ``deadline_s``)."""
        started = time.monotonic()
        try:
            loaded = await asyncio.wait_for(self._download_from(peer, timeout, max_bytes), min(deadline_s, left_s))
            if loaded is not None:
                check_downloaded_state(*loaded, local, max_epoch)
            return loaded
        except StateRejected as rejected:
            self.bans.ban(peer.to_base58(), self.prefix, "state", f"served a state we refused: {rejected}")
        except asyncio.TimeoutError as error:  # the whole download's deadline, or one message's timeout
            if time.monotonic() - started < deadline_s:
                logger.info(f"failed to download state from {peer}: {error!r}")
                return None
            reason = f"was still streaming its state after {deadline_s:.0f}s, the deadline of one server"
            self.bans.ban(peer.to_base58(), self.prefix, "state", reason, proven=False)  # or its link is slow
        except Exception as error:  # this peer failed to send; the next one may not
            logger.info(f"failed to download state from {peer}: {error!r}")
        return None

    def _name_dissenters(self, agreement: Agreement, adopted: Candidate, partner: Candidate, distance: float) -> None:
        logger.info(
            f"verified the state from {adopted.peer}: epoch {adopted.epoch}, agreed by {adopted.voter} and "
            f"{partner.voter} (state distance {distance:.3f} <= {agreement.tol})"
        )
        for other, apart in agreement.dissenters(adopted, partner):
            reason = (
                f"served a state at epoch {other.epoch} that disagreed (state distance {apart:.2f} > {NAME_TOL}) "
                f"with the one 2 other voters agree on ({adopted.voter}, {partner.voter})"
            )
            # not proven: an honest DiLoCo peer whose outer round failed can sit near 1 from the swarm's state
            self.bans.ban(other.peer, self.prefix, "state", reason, proven=False)

    async def _download_from(self, peer: PeerID, timeout: float | None, max_bytes: int):
        """(metadata, tensors) as ``peer`` streams them, or None when it sent no state; StateRejected past
        ``max_bytes``."""
        started = time.monotonic()
        stub = self.get_stub(self._p2p, peer, namespace=self.prefix)
        stream = await stub.rpc_download_state(averaging_pb2.DownloadRequest())
        metadata, parts, tensors, received = None, [], [], 0
        async for message in aiter_with_timeout(stream, timeout=timeout):
            received += len(message.metadata) + len(message.tensor_part.buffer)
            if received > max_bytes:
                raise StateRejected(f"it streamed more than {max_bytes:,} bytes, more than our whole state could take")
            if message.metadata:
                metadata = self.serializer.loads(message.metadata)
            if message.tensor_part.dtype and parts:  # a dtype starts the next tensor
                tensors.append(deserialize_torch_tensor(combine_from_streaming(parts)))
                parts = []
            parts.append(message.tensor_part)
        if parts:
            tensors.append(deserialize_torch_tensor(combine_from_streaming(parts)))
        if not metadata:
            logger.debug(f"peer {peer} did not send its state")
            return None
        logger.debug(f"downloaded state from {peer} in {time.monotonic() - started:.3f}s")
        return metadata, tensors


class SafeStateAverager(RobustAveraging, TrainingStateAverager, _VerifiedDownload):
    """TrainingStateAverager that verifies what it downloads and hands peers copies of its CPU tensors.

    Downloads: see ``check_downloaded_state``; ``max_epoch`` (a callable, None = unbounded) bounds the
    epoch a state may claim. Sharing: hivemind sends the state a peer downloads through a
    multiprocessing pipe, and pickling a CPU tensor moves its storage into shared memory in place,
    freeing the old buffer. On CPU, ``param.cpu()`` is the parameter itself, so a peer downloading
    our state while we train freed memory under our own forward pass: the miner segfaulted in
    libtorch_cpu (seen with 4 CPU miners, a late joiner loading state). On GPU, ``.cpu()`` already
    copies, so this costs nothing there.

    ``aggregation_rule`` and ``bans`` (``RobustAveraging``): its parameter-averaging rounds are robust
    with a rule; peers it catches (in those rounds, or serving a state it refuses) are banned in ``bans``.
    """

    def __init__(self, *args, max_epoch: Callable[[], int | None] | None = None, **kwargs):
        if max_epoch is not None:
            self.max_epoch = max_epoch
        self._transition = threading.RLock()  # see step()
        super().__init__(*args, **kwargs)

    @classmethod
    @follows(ServicerBase, "_get_handle_name", "d3e13c74c5e52049")
    def _get_handle_name(cls, namespace, method_name: str) -> str:
        # RPC names carry the class name: keep hivemind's, so plain hivemind peers (and our validator) can download from
        # us
        return TrainingStateAverager._get_handle_name(namespace, method_name)

    @follows(TrainingStateAverager, "step", "c68d9335d0ccf55e")
    def step(self, *args, increment_epoch: bool = False, **kwargs):
        # hivemind raises local_epoch before the optimizer step it submits has run: a state served in
        # between carried epoch E+1 with epoch E's parameters (a validator then judged DiLoCo miners'
        # spot checks at the wrong parameters, cosine 0.19-0.74). An epoch's transition, up to the
        # step's own return (after the optimizer step unless that is delayed), is not served halfway.
        if not increment_epoch:
            return super().step(*args, **kwargs)
        with self._transition:
            return super().step(*args, increment_epoch=True, **kwargs)

    @follows(TrainingStateAverager, "get_current_state", "d2ee431a0a4b4074")
    def get_current_state(self):
        # no epoch transition (step) nor background optimizer step halfway through the copy
        with self._transition, self.lock_optimizer:
            metadata, tensors, infos = super().get_current_state()
            tensors = [t.clone() if t.device.type == "cpu" else t for t in tensors]
        return metadata, tensors, infos
