#!/usr/bin/env bash
# Install Slurm + munge for tests/test_slurm.py on a fresh Debian 12 machine. Run as root; idempotent.
#
# Debian's slurm-wlm 22.05 (slurmctld, slurmd, slurm-client, basic plugins) and munge: ~12 s.
# Nothing is started or configured for the system: tests/slurm_cluster.py starts its own munged,
# slurmctld and slurmd from a temporary slurm.conf and munge key (SLURM_CONF points at it), on 127.0.0.1
# and free ports, and stops them at the end of the test module. The system munge key below is only made
# so that the installed packages are in their normal state (Debian's postinst usually creates it already).
set -euo pipefail

if [[ $(id -u) -ne 0 ]]; then
    echo "install_slurm.sh: run as root" >&2
    exit 1
fi

have_all() {
    local p
    for p in munged slurmctld slurmd sbatch srun scontrol scancel sinfo squeue; do
        PATH=$PATH:/usr/sbin:/sbin command -v "$p" >/dev/null 2>&1 || return 1
    done
}

if have_all; then
    echo "install_slurm.sh: slurm and munge already installed ($(PATH=$PATH:/usr/sbin slurmctld -V))"
else
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # policy-rc.d-less containers: package scripts may try to start the daemons and fail harmlessly.
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge
    have_all || { echo "install_slurm.sh: slurm binaries missing after install" >&2; exit 1; }
    echo "install_slurm.sh: installed $(PATH=$PATH:/usr/sbin slurmctld -V)"
fi

# System munge key (not used by the tests' private cluster): create once, munge-owned, mode 0400.
if [[ ! -s /etc/munge/munge.key ]]; then
    install -d -m 0700 -o munge -g munge /etc/munge
    if command -v mungekey >/dev/null 2>&1; then
        mungekey --create --keyfile=/etc/munge/munge.key --force
    else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
fi
