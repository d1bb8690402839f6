# Sendense: the same commands for people and CI.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := qemu-utils qemu-system-common nbdkit libnbd-bin python3-libnbd python3-venv \
                postgresql e2fsprogs ca-certificates xfsprogs dosfstools mtools ntfs-3g fdisk \
                golang-go golang-github-vmware-govmomi-dev chromium chromium-driver \
                xxhash b3sum iproute2
STAMP := $(VENV)/.installed

.PHONY: setup system-packages venv demo test test-fast check fmt bench clean

setup: system-packages venv

# Debian packages: qemu-img/qemu-nbd (qemu-utils), qemu-storage-daemon
# (qemu-system-common), nbdkit, nbdcopy (libnbd-bin), libnbd's Python binding,
# venv, PostgreSQL server binaries for the catalog tests, chattr/lsattr and
# mkfs.ext4 (e2fsprogs) for the repository tests, mkfs.xfs, mkfs.fat + mtools,
# mkntfs + ntfscp and sfdisk to build restore test disks without mounting
# (xfsprogs, dosfstools, mtools, ntfs-3g, fdisk), and CA certificates for
# HTTPS (pip); Go and govmomi's source to build the vCenter simulator the
# vmware tests run against (tests/vcsim, built offline, once). Without
# recommends: Debian 12 with them pulls ~355 packages (systemd, mesa, ffmpeg
# libraries); without, ~100.
system-packages:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# The venv comes from Debian's python3 with system site packages, so that
# `import nbd` (python3-libnbd) works inside it.
venv: $(STAMP)
$(STAMP): pyproject.toml
	@test -x $(PY) || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade 'pip>=24.2,<27'
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -c "import nbd" || { echo "python3-libnbd is not visible in $(VENV)"; exit 1; }
	@touch $(STAMP)

demo: setup
	$(VENV)/bin/sendense demo

test: setup
	$(PY) -m pytest -p no:cacheprovider tests

test-fast: venv
	$(PY) -m pytest -p no:cacheprovider -m "not slow" tests

check: venv
	$(VENV)/bin/ruff format --check src tests bench scripts
	$(VENV)/bin/ruff check src tests bench scripts
	$(VENV)/bin/mypy

fmt: venv
	$(VENV)/bin/ruff format src tests bench scripts
	$(VENV)/bin/ruff check --fix src tests bench scripts

# Every benchmark; each prints its figures as key=value on its last line.
.PHONY: bench-backup bench-api bench-consolidate bench-restore bench-policy bench-source \
        bench-console bench-topology bench-load
bench: bench-backup bench-api bench-consolidate bench-restore bench-policy bench-source \
       bench-console bench-topology bench-load

bench-backup: setup
	$(PY) bench/backup_bench.py

# The read API on 1,000 VMs / 100,000 backups, 1 then 50 clients (~12 min;
# `$(PY) bench/api_bench.py --quick` for a try in about a minute).
bench-api: venv
	$(PY) bench/api_bench.py

# Consolidation of a 4 GiB full + 3 incrementals against qemu-img convert.
bench-consolidate: setup
	$(PY) bench/consolidate_bench.py

# Whole-disk restore of a 4 GiB full + 3 incrementals against qemu-img convert.
bench-restore: setup
	$(PY) bench/restore_bench.py

# The scheduler's due set over 1,000 policies / 10,000 VMs and retention
# planning over 100,000 restore points (pure CPU, about a minute).
bench-policy: venv
	$(PY) bench/policy_bench.py

# The file source's hash pass against xxhsum and b3sum; a vmware full and a
# 10% incremental behind the vCenter simulator against nbdcopy (4 GiB).
bench-source: setup
	$(PY) bench/source_bench.py

# Web console pages on the API benchmark's catalog (100,000 backups): p95.
bench-console: venv
	$(PY) bench/console_bench.py

# Hub and node in two network namespaces (veth, one core each; root needed):
# full and 10% incremental with NBD TLS on and off against nbdcopy across the
# same link, LAN and WAN (10 ms RTT, 1 Gbit/s) profiles (about 4 minutes).
bench-topology: setup
	$(PY) bench/topology_bench.py

# Two hubs on one PostgreSQL catalog (5,000 VMs, 100,000 restore points), 200
# API requests/s (open loop) with 20 backup loops through 4 nodes: p50/p99
# under load, backups per minute, server errors (about 9 minutes;
# `$(PY) bench/load_bench.py --quick` for about 2; docs/operations.md).
bench-load: setup
	$(PY) bench/load_bench.py

clean:
	rm -rf var build *.egg-info

# API reference (docs/api.md, docs/openapi.json) from the hub's OpenAPI document.
# Checked in; tests/unit/test_docs_fresh.py fails when they are stale.
.PHONY: docs
docs: venv
	$(PY) scripts/gen_api_docs.py

# Kill -9 soak (tests/soak/soak.py): two hubs on one PostgreSQL catalog, two
# nodes, three qsd VMs; seeded random actions with kill -9 of a hub, node,
# qemu-nbd target, worker or VM, and the invariants after each fault. About
# 20 minutes by default; SOAK_ITERATIONS and SOAK_SEED to size or replay it.
.PHONY: soak
soak: setup
	SOAK_ITERATIONS=$(SOAK_ITERATIONS) SOAK_SEED=$(SOAK_SEED) $(PY) tests/soak/soak.py
