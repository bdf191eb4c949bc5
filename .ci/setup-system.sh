#!/usr/bin/env bash
# System set-up for the test suite (Debian/Ubuntu, run as root). Safe to run again:
#  - installs the tools the tests drive: a Docker engine, the CNCF distribution registry, skopeo,
#    umoci, debootstrap (the base image is made from Debian packages), promtool, openssl, and
#    chromium + chromium-driver (the console's browser test, tests/e2e/test_console_browser.py);
#  - starts dockerd when no engine answers (containers without systemd);
#  - starts a registry on 127.0.0.1:5000 when nothing answers there (the tests use it, or their own).
set -euo pipefail

PACKAGES=(ca-certificates curl openssl python3-venv docker.io docker-registry skopeo umoci debootstrap prometheus
          openjdk-17-jre-headless  # the JDK: pyspark local mode (modelpod.batch.spark_udf tests)
          chromium chromium-driver)  # headless Chromium + its WebDriver: the console's browser test
STATE=/var/lib/modelpod-ci
LOGS=/var/log/modelpod-ci

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup-system: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# kubectl (for `kubectl kustomize` in tests/deploy): Debian's kubernetes-client, unless one is installed.
if ! command -v kubectl >/dev/null 2>&1; then
  echo "setup-system: installing kubernetes-client (kubectl)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends kubernetes-client >/dev/null \
    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends kubernetes-client >/dev/null; }
fi

mkdir -p "$STATE" "$LOGS"

wait_for() {  # wait_for SECONDS WHAT COMMAND...: poll until COMMAND succeeds
  local deadline=$(( $(date +%s) + $1 )); local what=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    if [ "$(date +%s)" -ge "$deadline" ]; then echo "setup-system: $what did not come up" >&2; return 1; fi
    sleep 0.2
  done
}

if ! docker version --format '{{.Server.Version}}' >/dev/null 2>&1; then
  if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    systemctl start docker
  else
    echo "setup-system: starting dockerd (log: $LOGS/dockerd.log)"
    nohup dockerd >"$LOGS/dockerd.log" 2>&1 &
  fi
  wait_for 60 "dockerd" docker version --format '{{.Server.Version}}'
fi

if ! curl -fsS -o /dev/null http://127.0.0.1:5000/v2/ 2>/dev/null; then
  cat >"$STATE/registry.yml" <<EOF
version: 0.1
log: {level: warn, accesslog: {disabled: true}}
storage:
  filesystem: {rootdirectory: $STATE/registry}
  delete: {enabled: true}
http:
  addr: 127.0.0.1:5000
  secret: modelpod-ci-local-only
EOF
  echo "setup-system: starting docker-registry on 127.0.0.1:5000 (log: $LOGS/registry.log)"
  nohup docker-registry serve "$STATE/registry.yml" >"$LOGS/registry.log" 2>&1 &
  wait_for 30 "docker-registry" curl -fsS -o /dev/null http://127.0.0.1:5000/v2/
fi
echo "setup-system: ok (docker $(docker version --format '{{.Server.Version}}'), registry 127.0.0.1:5000)"
