#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh Debian machine, checks lint and types,
# then runs the suite on SQLite, and the tests that depend on the database again on a
# private PostgreSQL server started here on loopback (stopped at the end). Extra arguments
# go to pytest.
#   bash tests/run.sh [pytest args...]
# RELAY_TEST_POSTGRES=0 skips the PostgreSQL pass (on by default: .ci/run runs both).
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }

# Debian packages: swaks (a real SMTP client the tests use), PostgreSQL (server + psql),
# Chromium and its driver for the console's browser tests (tests/browser: Playwright drives
# Debian's /usr/bin/chromium; no browser is downloaded).
need=()
command -v swaks >/dev/null || need+=(swaks)
[ -x /usr/bin/chromium ] || need+=(chromium)
command -v chromedriver >/dev/null || need+=(chromium-driver)
if [ "${RELAY_TEST_POSTGRES:-1}" != 0 ]; then
  { [ -n "$(pg_bin)" ] && command -v psql >/dev/null; } || need+=(postgresql postgresql-client)
fi
if [ ${#need[@]} -gt 0 ]; then
  # another apt run (unattended upgrades, a machine's first boot) may hold the dpkg lock
  lock=(-o DPkg::Lock::Timeout=600)
  $SUDO apt-get "${lock[@]}" update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get "${lock[@]}" install -y -qq "${need[@]}" >/dev/null
fi

# Python packages, pinned by constraints.txt so pip never backtracks.
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -c constraints.txt -e '.[test]' 2>&1 \
  | grep -v "^WARNING: Location" || true

# Lint and types first (rules in pyproject.toml): a finding fails the run.
.venv/bin/ruff check relay tests bench
.venv/bin/mypy

status=0
.venv/bin/python -m pytest "$@" || status=$?
[ "${RELAY_TEST_POSTGRES:-1}" != 0 ] || exit $status

# A throwaway PostgreSQL cluster on 127.0.0.1, owned by an unprivileged user.
PGBIN=$(pg_bin)
PGDIR=$(mktemp -d /tmp/relay-pg.XXXXXX)
PGPORT=$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
as_pg() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
[ "$(id -u)" -ne 0 ] || chown postgres "$PGDIR"
stop_pg() { as_pg "$PGBIN/pg_ctl" -D "$PGDIR/data" -m fast stop >/dev/null 2>&1 || true; rm -rf "$PGDIR"; }
trap stop_pg EXIT
as_pg "$PGBIN/initdb" -D "$PGDIR/data" -A trust -U postgres >/dev/null
as_pg "$PGBIN/pg_ctl" -D "$PGDIR/data" -l "$PGDIR/log" -w start \
  -o "-h 127.0.0.1 -p $PGPORT -k $PGDIR -c fsync=off -c max_connections=300" >/dev/null
echo "PostgreSQL pass: server on 127.0.0.1:$PGPORT"
# only the tests whose outcome depends on the database (tests/conftest.py DATABASE_MODULES)
RELAY_TEST_DATABASE_URL="postgresql://postgres@127.0.0.1:$PGPORT/postgres" \
  .venv/bin/python -m pytest -m database "$@" || status=$?
exit $status
