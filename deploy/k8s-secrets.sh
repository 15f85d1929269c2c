#!/bin/sh
# make k8s-secrets: random Redis passwords for a Kubernetes overlay, in its git-ignored redis.env
# (the overlay's secretGenerator replaces the base's placeholders, which Redis refuses).
#   sh deploy/k8s-secrets.sh [overlay directory, default k8s/overlays/dev]
# An existing file is kept: a new password renames the Secret and restarts Redis and every client.
set -eu

dir=${1:-k8s/overlays/dev}
file="$dir/redis.env"
if [ ! -d "$dir" ]; then
    echo "k8s-secrets: no overlay directory $dir" >&2
    exit 2
fi
if [ -s "$file" ]; then
    echo "k8s-secrets: $file is already there, kept (delete it for new passwords)"
    exit 0
fi
random() { head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n'; }
(
    umask 077
    for role in admin bootstrap validator miner; do
        printf '%s-password=%s\n' "$role" "$(random)"
    done >"$file.tmp"
    mv "$file.tmp" "$file"
)
echo "k8s-secrets: wrote $file (4 random Redis passwords, readable by you only; git ignores it)"
echo "  next: kubectl apply -k $dir"
