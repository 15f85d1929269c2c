#!/bin/sh
# Starts redis-server with one user per HiveMiner role (docker-compose.yml and k8s/base/redis.yaml run it).
#
# What each role may do is hivetrain/swarm/redis_server.py role_rules (tests/test_deploy.py keeps the lines
# below equal to it): the bootstrap and the validator use their run's keys, nothing dangerous; a
# miner only reads (it writes through the bootstrap, which checks what it sends). `default` is the
# admin, for redis-cli and operators.
#
# Passwords: REDIS_<ROLE>_PASSWORD (ROLE: ADMIN, BOOTSTRAP, VALIDATOR, MINER) where set (Kubernetes:
# the redis-auth Secret); otherwise made at first start, kept in $AUTH_DIR/<role>/password, and the
# role's URL written to $AUTH_DIR/<role>/url (compose: each role's container mounts only its own
# folder and reads HIVE_REDIS_URL_FILE). A password shorter than 16 characters, or the placeholder
# "change-me...", is refused: there is no default password that works.
set -eu

run="${HIVE_RUN_ID:-hivetrain}"
auth="${AUTH_DIR:-/auth}"
host="${REDIS_HOST:-redis}"
port="${REDIS_PORT:-6379}"
data="${REDIS_DATA_DIR:-/data}"

rules_bootstrap="resetkeys ~hive:$run:* resetchannels +@all -@dangerous"
rules_validator="resetkeys ~hive:$run:* resetchannels +@all -@dangerous"
rules_miner="resetkeys ~hive:$run:* resetchannels -@all +ping +hello +auth +client|setname +select +multi +exec +discard +get +getrange +mget +exists +ttl +type +hget +hgetall +hmget +zrange +zrevrange +zrangebyscore +zrevrangebyscore +zcount +zcard +zscore +xrange +xrevrange +xlen"

case "$run" in
  *[!A-Za-z0-9._-]*|"") echo "HIVE_RUN_ID must be letters, digits, '-', '_' or '.', got '$run'" >&2; exit 2 ;;
esac

password() {  # the role's password: from REDIS_<ROLE>_PASSWORD, else kept in $auth/<role>/password
  role="$1"
  given=$(eval "printf %s \"\${REDIS_$(echo "$role" | tr a-z A-Z)_PASSWORD:-}\"")
  if [ -n "$given" ]; then
    secret="$given"
  else
    mkdir -p "$auth/$role"
    if [ ! -s "$auth/$role/password" ]; then
      (umask 077; head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$auth/$role/password")
    fi
    secret=$(cat "$auth/$role/password")
  fi
  case "$secret" in
    change-me*) echo "the Redis password of $role is the placeholder '$secret': set REDIS_$(echo "$role" | tr a-z A-Z)_PASSWORD; on Kubernetes: make k8s-secrets, then kubectl apply -k k8s/overlays/dev (docs/deploy.md#secrets-to-change)" >&2; exit 2 ;;
    *[!A-Za-z0-9_.~-]*) echo "the Redis password of $role may only use A-Z a-z 0-9 _ - . ~" >&2; exit 2 ;;
  esac
  if [ "${#secret}" -lt 16 ]; then
    echo "the Redis password of $role is shorter than 16 characters" >&2; exit 2
  fi
  printf %s "$secret"
}

admin=$(password admin)
acl="$data/users.acl"
mkdir -p "$data"
(
  umask 077
  printf 'user default on >%s ~* &* +@all\n' "$admin" > "$acl"
  for role in bootstrap validator miner; do
    secret=$(password "$role")
    eval "rules=\$rules_$role"
    printf 'user %s on >%s %s\n' "$role" "$secret" "$rules" >> "$acl"
    if [ -d "$auth/$role" ]; then  # the URL its container reads (HIVE_REDIS_URL_FILE); only that role mounts the folder
      printf 'redis://%s:%s@%s:%s/0\n' "$role" "$secret" "$host" "$port" > "$auth/$role/url"
      chmod 0444 "$auth/$role/url"
    fi
  done
)
# redis-cli (the healthcheck) reads the admin password from here
(umask 077; printf %s "$admin" > "$data/admin-password")

exec redis-server --port "$port" --dir "$data" --aclfile "$acl" --appendonly yes "$@"
