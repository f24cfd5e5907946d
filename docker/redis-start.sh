#!/bin/sh
# Starts Redis for docker-compose.yml with the service's ACL user, `inversion`.
#
# The password comes from REDIS_PASSWORD (compose refuses to start without it) and the
# services' INVERSION_REDIS_URL carries the same one. Only its SHA-256 is passed to
# redis-server, so no process listing shows the password. redis.conf turns the
# password-less `default` user off: every client must authenticate as `inversion`.
#
# What `inversion` may do: every key and channel (RQ and the service own the whole
# database), every command except the @dangerous ones (FLUSHALL, CONFIG SET, DEBUG,
# SHUTDOWN, MODULE, ACL changes, KEYS, ...), with back only the read-only two it uses:
# INFO (RQ reads the server version) and CONFIG GET (the gateway checks noeviction).
set -eu
: "${REDIS_PASSWORD:?set REDIS_PASSWORD}"
hash=$(printf '%s' "$REDIS_PASSWORD" | sha256sum | cut -d ' ' -f 1)
# The image's entrypoint starts the server as the unprivileged `redis` user.
exec docker-entrypoint.sh redis-server /usr/local/etc/redis/redis.conf \
    --user inversion on "#$hash" '~*' '&*' '+@all' '-@dangerous' '+info' '+config|get'
