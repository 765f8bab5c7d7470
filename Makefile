# Install, build and test the DyVEDeep harness. `make setup` makes .venv with everything;
# `make test` runs the tests (setting up first when needed); `make all` runs the pipeline.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
KERNELS := $(wildcard dyvedeep/*.pyx dyvedeep/*.pxd dyvedeep/*.h) setup.py
CORES ?= 32

.PHONY: setup build test test-fast test-pi test-slurm all lint clean proto bench

setup: $(STAMP) build

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/pip install --quiet "cython>=3.0" "numpy>=1.24" "scipy>=1.10"
	$(BIN)/pip install --quiet --no-build-isolation -e ".[reference,pipeline,test]"
	touch $(STAMP)

# Rebuild the Cython kernels in place when their sources change.
build: $(STAMP) dyvedeep/.built
dyvedeep/.built: $(KERNELS)
	$(BIN)/python setup.py --quiet build_ext --inplace
	touch $@

test: setup
	$(BIN)/python -m pytest -q tests

# The Pi path on an emulated aarch64 board (root; first build 5-20 min, then cached in .pi/).
test-pi: setup pi-build
	$(BIN)/python -m pytest -q tests/pi

# The Slurm profile against a real one-node Slurm on this machine (root; tools/slurm_cluster.py
# installs munge, slurmctld, slurmd, slurmdbd and MariaDB with apt-get, then starts and stops
# them by PID; a few minutes).
test-slurm: setup
	$(BIN)/python -m pytest -q tests/slurm

# The emulated Raspberry Pi (tools/pi_emulator.py): build caches its root filesystem in .pi/,
# start prints (and writes .pi/board.json) host, port, user and key; stop ends it by its PID.
.PHONY: pi-build pi-start pi-stop pi-status sshd chromium
pi-build pi-start pi-stop pi-status:
	$(PYTHON) tools/pi_emulator.py $(@:pi-%=%)

# Debian's OpenSSH server, for the loopback SSH test (tests/test_remote_ssh.py skips without it).
sshd:
	@test -x /usr/sbin/sshd || DEBIAN_FRONTEND=noninteractive apt-get install -y -q openssh-server \
	  || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q openssh-server) \
	  || echo "sshd: could not install openssh-server; the loopback SSH test will skip"

# Debian's Chromium, for the test that opens the report in a real browser (it skips without it).
chromium:
	@command -v chromium >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium \
	  || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium) \
	  || echo "chromium: could not install it; the report browser test will skip"

all: setup
	$(BIN)/snakemake --cores $(CORES) all

lint: setup
	$(BIN)/snakemake --lint

# Regenerate dyvedeep/caffe_pb2.py from dyvedeep/caffe.proto (needs grpcio-tools).
proto: $(STAMP)
	$(BIN)/pip install --quiet grpcio-tools
	$(BIN)/python -m grpc_tools.protoc -Idyvedeep --python_out=dyvedeep dyvedeep/caffe.proto

clean:
	rm -rf build dyvedeep/*.so dyvedeep/_kernels.c dyvedeep/.built
