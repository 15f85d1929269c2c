"""``python -m hivetrain.validator``: the validator loop in this process, its API in a gunicorn child.

The API (``hivetrain.validator.app:create_app()``) starts once the validator is set up (its wallet
exists) and is supervised by ``hivetrain.runtime``: restarted if it dies, and the validator exits 1
if it keeps dying. On shutdown the API stops first, then the validator.
"""

from __future__ import annotations

from hivetrain.runtime import Runtime, run_service
from hivetrain.settings import ValidatorSettings

APP_SPEC = "hivetrain.validator.app:create_app()"


def main(argv: list[str] | None = None) -> int:
    """Validate until stopped; return the exit code (``hivetrain.runtime`` says which)."""
    return run_service(ValidatorSettings, _run, argv, name="validator", repeat_sigint="ignore")


def _run(runtime: Runtime[ValidatorSettings]) -> None:
    import transformers  # with hivemind and torch: only when we run

    from hivetrain.validator.service import Validator

    settings = runtime.settings
    transformers.utils.logging.disable_progress_bar()
    validator = Validator(settings, runtime.stop)  # a start that fails undoes what it built
    runtime.on_cleanup(validator.shutdown)
    runtime.serve(APP_SPEC, settings.api_host, settings.api_port, settings.api_workers)
    validator.run()


if __name__ == "__main__":
    raise SystemExit(main())
