#!/usr/bin/env bash
# Install the SLURM + MUNGE Debian packages that tests/test_slurm.py needs.
#
#   bash .ci/slurm-setup.sh
#
# Idempotent and quiet: does nothing when the SLURM daemons, client tools, munged and pgrep
# are already on PATH. Needs root (or passwordless sudo) and apt. Starts no
# daemons: slurm_cluster.LocalSlurmCluster runs its own, from the config that
# tests/slurm_cluster/ ships, under a temporary directory.
set -euo pipefail

have_all() {
  for bin in slurmctld slurmd sbatch srun scontrol sinfo squeue scancel munged pgrep; do
    command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ] || return 1
  done
}

if have_all; then
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo -n"
fi

export DEBIAN_FRONTEND=noninteractive
LOG=$(mktemp)
# policy-rc.d: the packages' postinst must not try to start services
# (there is no systemd/init in CI containers; starting would fail or linger).
POLICY=/usr/sbin/policy-rc.d
CREATED_POLICY=0
cleanup() {
  if [ "$CREATED_POLICY" = 1 ]; then $SUDO rm -f "$POLICY"; fi
  rm -f "$LOG"
}
trap cleanup EXIT
if [ ! -e "$POLICY" ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null
  $SUDO chmod +x "$POLICY"
  CREATED_POLICY=1
fi

# slurm-wlm: slurmctld + slurmd + client tools; munge: auth daemon; procps: pgrep
# (tests check that teardown left no daemons). Output only shown on failure.
if ! { $SUDO apt-get update -qq && \
       $SUDO apt-get install -y -qq --no-install-recommends slurm-wlm munge procps; } >"$LOG" 2>&1; then
  cat "$LOG" >&2
  echo "slurm-setup: apt-get failed" >&2
  exit 1
fi

have_all || { echo "slurm-setup: packages installed but binaries missing" >&2; exit 1; }
