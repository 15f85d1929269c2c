#!/bin/sh
# Per-container defaults that a static environment cannot express, then exec the miner.
# Anything already set wins: Kubernetes sets all of these itself; compose (which --engine docker
# runs) relies on this script.
#
# * HIVE_ANNOUNCE_MADDRS, HIVE_CHALLENGE_URL: a scaled compose replica has no DNS name of its
#   own, so it announces its container IP (and the DHT/challenge ports it listens on).
# * MINER_DATA_DIR (compose: one volume shared by every replica): claim the first free slot
#   $MINER_DATA_DIR/slot-N with flock and keep the wallet, checkpoints and DHT identity there.
#   A restarted replica gets its hotkey and checkpoints back; two live replicas never share a
#   slot. The lock is on fd 9, which the miner inherits through exec: it is released when the
#   miner exits.
# * HIVE_DEVICE=auto with a slot and several GPUs visible: slot N trains on cuda:(N mod GPUs),
#   since Docker gives every replica the same devices.
set -eu

first_ipv4() {
    for addr in $(hostname -i 2>/dev/null); do
        case "$addr" in *.*) echo "$addr"; return 0 ;; esac
    done
    return 1
}

# the TCP port of the first /tcp/N in HIVE_HOST_MADDRS (a JSON list), empty when none is fixed
dht_port=$(printf '%s' "${HIVE_HOST_MADDRS:-}" | sed -n 's#^[^/]*/[^"]*/tcp/\([0-9][0-9]*\).*#\1#p')
ip=$(first_ipv4 || true)

if [ -z "${HIVE_ANNOUNCE_MADDRS:-}" ] && [ -n "$ip" ] && [ -n "$dht_port" ] && [ "$dht_port" != 0 ]; then
    export HIVE_ANNOUNCE_MADDRS="[\"/ip4/$ip/tcp/$dht_port\"]"
fi
if [ -z "${HIVE_CHALLENGE_URL:-}" ] && [ -n "$ip" ] && [ "${HIVE_CHALLENGE_PORT:-0}" != 0 ]; then
    export HIVE_CHALLENGE_URL="http://$ip:$HIVE_CHALLENGE_PORT"
fi

if [ -n "${MINER_DATA_DIR:-}" ]; then
    slot=0
    while :; do
        dir="$MINER_DATA_DIR/slot-$slot"
        mkdir -p "$dir"
        exec 9>"$dir/lock"
        if flock -n 9; then break; fi
        exec 9>&-
        slot=$((slot + 1))
        if [ "$slot" -ge 1024 ]; then
            echo "entrypoint: no free miner slot under $MINER_DATA_DIR" >&2
            exit 1
        fi
    done
    export HIVE_WALLET_DIR="${HIVE_WALLET_DIR:-$dir/wallets}"
    export HIVE_CHECKPOINT_DIR="${HIVE_CHECKPOINT_DIR:-$dir/checkpoints}"
    export HIVE_IDENTITY_PATH="${HIVE_IDENTITY_PATH:-$dir/identity.key}"
    echo "entrypoint: miner slot $slot ($dir)"
    if [ "${HIVE_DEVICE:-auto}" = auto ] && command -v nvidia-smi >/dev/null 2>&1; then
        gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
        if [ "${gpus:-0}" -gt 1 ]; then
            export HIVE_DEVICE="cuda:$((slot % gpus))"
        fi
    fi
fi

echo "entrypoint: announce ${HIVE_ANNOUNCE_MADDRS:-(what p2pd sees)}, spot checks at ${HIVE_CHALLENGE_URL:-(miner default)}, device ${HIVE_DEVICE:-auto}"
exec "$@"
