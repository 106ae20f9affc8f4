#!/bin/sh
# Installs systemd-analyze for tests/service (the unit files are verified with it).
# Does nothing when it is already there; needs root and a Debian/Ubuntu image.
# Fails when it cannot: without systemd-analyze those tests fail, not skip, so a
# CI run must not go on as if they could pass.
set -eu
if command -v systemd-analyze >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "install-systemd: systemd-analyze is missing and cannot be installed here" \
        "(needs root and apt-get); tests/service needs it" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends systemd >/dev/null
if ! command -v systemd-analyze >/dev/null 2>&1; then
    echo "install-systemd: installed the systemd package, still no systemd-analyze" >&2
    exit 1
fi
