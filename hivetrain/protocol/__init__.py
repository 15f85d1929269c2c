"""What the roles (miner, validator, bootstrap, swarm launcher) agree on, and nothing else.

* ``records``     Redis key names, TTLs, stream caps and the strict record schemas.
* ``envelopes``   how records travel signed: registrations, departures, telemetry stream entries.
* ``binding``     a hotkey's proof that it holds a peer id's libp2p key.
* ``spotcheck``   the spot-check wire format (``Challenge``, ``SpotCheckAnswer``) and its threshold.
* ``projection``  the projected gradient both sides compute for a spot check.
* ``progress``    what a plausible progress record is (the epoch bound, the sample rate).
* ``training``    the training state miners share and validators download (groups, optimizer, codecs).
* ``rounds``      averaging rounds read back from the miners' telemetry.
* ``checkpoints`` how a miner's checkpoints lie on disk, for whoever reads them.

Nothing here talks to the network or Redis. It sits low in the stack (pyproject.toml's layers
contract): it imports only ``identity``, ``log`` and the external libraries that define its formats.
"""
