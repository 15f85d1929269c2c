"""Container health check: ``python healthcheck.py PORT_VARIABLE PATH`` exits 0 when
``GET http://127.0.0.1:$PORT_VARIABLE/PATH`` answers 2xx, 1 otherwise.

Exec-form HEALTHCHECKs do not expand variables and slim images have no curl, so the port is
read from the same ``HIVE_*`` setting the service binds (stdlib only: runs in every image).
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

DEFAULT_PORTS = {"HIVE_HTTP_PORT": "8000", "HIVE_API_PORT": "8100", "HIVE_CHALLENGE_PORT": "8200"}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: healthcheck.py PORT_VARIABLE PATH, e.g. healthcheck.py HIVE_HTTP_PORT /healthz", file=sys.stderr)
        return 2
    port_variable, path = args
    port = os.environ.get(port_variable) or DEFAULT_PORTS.get(port_variable, "")
    if not port.isdigit() or int(port) == 0:
        print(f"unhealthy: {port_variable}={port!r} is not a fixed port", file=sys.stderr)
        return 1
    url = f"http://127.0.0.1:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # raises HTTPError on 4xx/5xx
            return 0 if 200 <= response.status < 300 else 1
    except (urllib.error.URLError, OSError) as error:
        print(f"unhealthy: {url}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
