"""``python -m hivetrain.miner``: settings from HIVE_* env vars and flags, then train until stopped."""

from __future__ import annotations

import logging
import signal
import threading

import transformers

from hivetrain.dht import reset_signal_handlers_in_children
from hivetrain.log import get_logger
from hivetrain.protocol.discovery import BootstrapUnavailable
from hivetrain.miner.train import Miner
from hivetrain.settings import MinerSettings, load_settings

logger = get_logger("hivetrain.miner")


def install_stop_handlers(stop: threading.Event) -> None:
    """First SIGTERM/SIGINT: finish the step, checkpoint and leave. A second SIGINT interrupts at once."""

    def _handle(signum, _frame):
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        logger.info(f"received {signal.Signals(signum).name}: stopping after this step")
        stop.set()

    signal.signal(signal.SIGTERM, _handle)
    signal.signal(signal.SIGINT, _handle)


def main(argv: list[str] | None = None) -> int:
    settings = load_settings(MinerSettings, argv)
    logging.getLogger("hivetrain").setLevel(settings.log_level)
    transformers.utils.logging.disable_progress_bar()  # no tqdm bars in service logs
    stop = threading.Event()
    install_stop_handlers(stop)
    reset_signal_handlers_in_children()
    miner = Miner(settings, stop)
    try:
        miner.setup()
        miner.train()
    except BootstrapUnavailable as error:
        logger.error(str(error))
        return 2
    except ValueError as error:  # bad configuration found while building: say it plainly
        logger.error(f"configuration error: {error}")
        return 2
    finally:
        miner.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
