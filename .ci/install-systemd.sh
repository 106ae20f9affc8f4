#!/bin/sh
# Installs systemd-analyze for tests/service (the unit files are verified with it).
# Does nothing when it is already there; needs root and a Debian/Ubuntu image.
set -eu
if command -v systemd-analyze >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "install-systemd: systemd-analyze missing and apt-get unavailable (or not root);" \
        "tests/service unit checks will be skipped" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends systemd >/dev/null
command -v systemd-analyze
