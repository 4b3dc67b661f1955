#!/bin/sh
# The official redis image's entrypoint contract, for the stand-in built by ./Dockerfile.
set -e

# The official image's umask for the data files (inherited by the redis-server below).
if [ "$(umask)" = '0022' ]; then
	umask 0077
fi

# A first argument that is an option (`--maxmemory ...`) or a config file runs redis-server with it.
if [ "${1#-}" != "$1" ] || [ "${1%.conf}" != "$1" ]; then
	set -- redis-server "$@"
fi

if [ "$1" = 'redis-server' ]; then
	# The official image builds Redis with protected mode off; Debian's is on, which refuses every client but
	# loopback when no password is set. Off unless a config file comes first (it then decides, or a later
	# --protected-mode yes on the command line does).
	case "${2:-}" in
		*.conf) ;;
		*) shift; set -- redis-server --protected-mode no "$@" ;;
	esac
	# Started as root: own the data directory, then run as redis (as the official image does).
	if [ "$(id -u)" = '0' ]; then
		find . \! -user redis -exec chown redis '{}' +
		exec gosu redis "$@"
	fi
fi

exec "$@"
