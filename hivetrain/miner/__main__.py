"""``python -m hivetrain.miner``: settings from HIVE_* env vars and flags, then train until stopped.

First SIGTERM/SIGINT: finish the step, checkpoint and leave. A second SIGINT interrupts at once.
"""

from __future__ import annotations

from hivetrain.runtime import Runtime, run_service
from hivetrain.settings import MinerSettings


def main(argv: list[str] | None = None) -> int:
    """Train until stopped; return the exit code (``hivetrain.runtime`` says which)."""
    return run_service(MinerSettings, _run, argv, name="miner", repeat_sigint="interrupt")


def _run(runtime: Runtime[MinerSettings]) -> None:
    import transformers  # torch, hivemind and transformers load here: --help and --version answer before them

    from hivetrain.miner.train import Miner

    transformers.utils.logging.disable_progress_bar()  # no tqdm bars in service logs
    miner = Miner(runtime.settings, runtime.stop)
    runtime.on_cleanup(miner.shutdown)
    miner.setup()
    miner.train()


if __name__ == "__main__":
    raise SystemExit(main())
