"""``hivetrain`` (the console script) and ``python -m hivetrain``: every service behind one command.

    hivetrain swarm [flags]        a local swarm: Redis, the bootstrap, miners and a validator
    hivetrain miner [flags]        one miner
    hivetrain validator [flags]    one validator and its API
    hivetrain bootstrap [flags]    the bootstrap peer and its API
    hivetrain status [flags]       one miner's standing, from the validator's API (exit 1: something is wrong)
    hivetrain --version

Each command is ``python -m hivetrain.<command>`` (those keep working), with the same flags and
``HIVE_*`` variables; ``hivetrain <command> --help`` lists them. Exit codes are the services' own
(``hivetrain.runtime``); an unknown command exits 2, naming the closest one.
"""

from __future__ import annotations

import difflib
import importlib
import sys

from hivetrain import __version__

#: command -> (the module whose main() runs it, what it starts)
COMMANDS = {
    "swarm": ("hivetrain.swarm.__main__", "a local swarm: Redis, the bootstrap, miners and a validator"),
    "miner": ("hivetrain.miner.__main__", "one miner"),
    "validator": ("hivetrain.validator.__main__", "one validator and its API"),
    "bootstrap": ("hivetrain.bootstrap.__main__", "the bootstrap peer and its API"),
    "status": ("hivetrain.status", "one miner's standing, from the validator's API"),
}
EXIT_CONFIG = 2  # hivetrain.runtime's, without importing it before a command is chosen


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items()]
    return "\n".join(
        [
            "usage: hivetrain {" + ",".join(COMMANDS) + "} [flags]   (hivetrain <command> --help lists its flags)",
            "       hivetrain --version",
            "",
            *lines,
        ]
    )


def main(argv: list[str] | None = None) -> int:
    """Run the command ``argv`` names with the rest of ``argv`` as its flags; return its exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if args else sys.stderr)
        return 0 if args else EXIT_CONFIG
    if args[0] == "--version":
        print(f"hivetrain {__version__}")
        return 0
    command, flags = args[0], args[1:]
    if command not in COMMANDS:
        close = difflib.get_close_matches(command, COMMANDS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        print(f"hivetrain: no command {command!r}{hint}\n{usage()}", file=sys.stderr)
        return EXIT_CONFIG
    return importlib.import_module(COMMANDS[command][0]).main(flags)


if __name__ == "__main__":
    raise SystemExit(main())
