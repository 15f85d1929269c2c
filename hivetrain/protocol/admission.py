"""Admission: which peer ids may take part in training, and which hotkey each one votes for.

A libp2p key is free, a hotkey on the chain is not. A peer id is admitted when a live registration binds it
(``hivetrain.protocol.binding``) to a hotkey the chain admits (``hivetrain.admission`` reads both); every
defence of the training path (matchmaking, the all-reduce's parts and answers, state downloads, progress
records) asks ``Admission`` and counts a peer as its hotkey (``voter``): all the peer ids of one hotkey are
one vote, and a ban on one of them is a ban on the hotkey.

``Admission.open()`` admits every peer id and knows no hotkeys: each peer id is its own voter, which is
hivemind's behaviour (a throwaway local swarm's ``HIVE_ADMISSION=open``).

Each process that asks (an averager's forked child, the optimizer in its parent) reads the admitted set
itself: the first question in a process loads it (a bounded Redis read), then a daemon thread of that
process reloads it every ``refresh_s``. A failed reload keeps the last set: an outage of Redis or the
chain admits nobody new and drops nobody. Until a first load succeeds, nobody is admitted.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Callable, Mapping

from hivetrain.log import get_logger

logger = get_logger(__name__)

#: Guards a process's first load. Made anew in every forked child: a lock the parent held while it forked (its
#: tracker's thread loading while hivemind forked an averager) would be held forever in the child.
_first_load = threading.Lock()


def _fresh_lock_in_child() -> None:
    global _first_load
    _first_load = threading.Lock()


os.register_at_fork(after_in_child=_fresh_lock_in_child)

#: How often a process rereads the admitted peers (a new miner waits at most this long to be let in).
ADMISSION_REFRESH_S = 10.0
#: A peer refused for not being admitted is logged again at most this often.
RELOG_AFTER_S = 600.0


class Admission:
    """Admitted peer ids and their hotkeys, from ``load`` (``{peer_id: hotkey}``; None: open admission)."""

    def __init__(
        self, load: Callable[[], Mapping[str, str]] | None, refresh_s: float = ADMISSION_REFRESH_S, what: str = ""
    ):
        if not refresh_s > 0:
            raise ValueError(f"refresh_s must be > 0, got {refresh_s}")
        self._load, self.refresh_s, self.what = load, float(refresh_s), what or "the admitted peers"
        self._peers: dict[str, str] = {}
        self._pid: int | None = None  # the process whose thread keeps _peers fresh
        self._logged: dict[str, float] = {}  # peer id -> time.monotonic() its refusal was last logged
        self._failing = False  # the last reload failed (logged once per outage)
        self._closed = threading.Event()

    @classmethod
    def open(cls) -> "Admission":
        """Every peer id admitted, each its own voter."""
        return cls(None)

    @classmethod
    def fixed(cls, peers: Mapping[str, str]) -> "Admission":
        """Exactly ``peers`` (peer id -> hotkey) admitted, for good."""
        frozen = dict(peers)
        return cls(lambda: frozen, refresh_s=3600.0, what="a fixed set")

    @property
    def is_open(self) -> bool:
        return self._load is None

    def admits(self, peer_id: str) -> bool:
        return self.is_open or peer_id in self._current()

    def hotkey_of(self, peer_id: str) -> str | None:
        return None if self.is_open else self._current().get(peer_id)

    def voter(self, peer_id: str) -> str:
        """Whom ``peer_id`` counts as: its hotkey when admitted, else itself."""
        hotkey = self.hotkey_of(peer_id)
        return peer_id if hotkey is None else f"hotkey:{hotkey}"

    def refusal(self, peer_id: str, where: str) -> str | None:
        """Why ``peer_id`` may not take part in ``where`` (logged once per ``RELOG_AFTER_S``), or None."""
        if self.admits(peer_id):
            return None
        reason = f"{peer_id} is not admitted (no live registration binds it to a hotkey the chain admits)"
        now = time.monotonic()
        if now - self._logged.get(peer_id, -RELOG_AFTER_S) >= RELOG_AFTER_S:
            if len(self._logged) >= 10_000:
                self._logged.clear()
            self._logged[peer_id] = now
            logger.warning(f"{where}: refusing {reason}")
        return reason

    def _current(self) -> dict[str, str]:
        if self._pid != os.getpid():  # first question in this process (a forked child starts with none)
            with _first_load:
                if self._pid != os.getpid():
                    self._peers = {}
                    self._reload()
                    self._pid = os.getpid()
                    threading.Thread(target=self._keep_fresh, args=(self._pid,), daemon=True).start()
        return self._peers

    def close(self) -> None:
        """Stop rereading (in this process; a forked child's thread ends with its process)."""
        self._closed.set()

    def _keep_fresh(self, pid: int) -> None:
        while os.getpid() == pid and not self._closed.wait(self.refresh_s):
            self._reload()

    def _reload(self) -> None:
        try:
            loaded = self._load()
        except Exception as error:  # Redis or the chain (network boundaries): keep the last set, retry later
            if not self._failing:
                logger.warning(f"could not reread {self.what} ({type(error).__name__}: {error}); keeping the last set")
            self._failing = True
            return
        if self._failing:
            logger.info(f"reread {self.what} again")
        self._failing = False
        self._peers = {str(peer): str(hotkey) for peer, hotkey in loaded.items()}


#: Shared by everything built without an admission: hivemind's behaviour.
OPEN = Admission.open()
