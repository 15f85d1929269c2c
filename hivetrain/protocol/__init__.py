"""What the roles (miner, validator, bootstrap, swarm launcher) agree on, and nothing else.

* ``records``     Redis key names, TTLs, stream caps and the strict record schemas.
* ``spotcheck``   the spot-check wire format (``Challenge``, ``SpotCheckAnswer``) and its threshold.
* ``projection``  the projected gradient both sides compute for a spot check.
* ``training``    the training state miners share and validators download (groups, optimizer, codecs).
* ``discovery``   finding the swarm: initial peers from the bootstrap's HTTP API.
* ``rounds``      averaging rounds read back from the miners' telemetry.
* ``checkpoints`` how a miner's checkpoints lie on disk, for whoever reads them.

Roles import this package and the shared modules beside it, never each other (the
import-linter contracts in pyproject.toml).
"""
