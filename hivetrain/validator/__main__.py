"""``python -m hivetrain.validator``: the validator loop in this process, its API in a gunicorn child."""

from __future__ import annotations

import logging
import signal
import threading

import transformers

from hivetrain.dht import reset_signal_handlers_in_children
from hivetrain.log import get_logger
from hivetrain.protocol.discovery import BootstrapUnavailable
from hivetrain.settings import ValidatorSettings, load_settings

logger = get_logger("hivetrain.validator")


def main(argv: list[str] | None = None) -> int:
    from hivetrain.validator.api import start_api, stop_api
    from hivetrain.validator.service import Validator

    settings = load_settings(ValidatorSettings, argv)
    logging.getLogger("hivetrain").setLevel(settings.log_level)
    transformers.utils.logging.disable_progress_bar()
    stop = threading.Event()

    def _handle(signum, _frame):
        logger.info(f"{signal.Signals(signum).name} received; stopping")
        stop.set()

    signal.signal(signal.SIGTERM, _handle)
    signal.signal(signal.SIGINT, _handle)
    reset_signal_handlers_in_children()
    validator, api = Validator(settings, stop), None
    try:
        validator.setup()
        api = start_api(settings)
        validator.run()
    except BootstrapUnavailable as error:
        logger.error(str(error))
        return 2
    except ValueError as error:
        logger.error(f"configuration error: {error}")
        return 2
    finally:
        stop_api(api)
        validator.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
