# Install, build and test the DyVEDeep harness. `make setup` makes .venv with everything;
# `make test` runs the tests (setting up first when needed); `make all` runs the pipeline.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
KERNELS := $(wildcard dyvedeep/*.pyx dyvedeep/*.pxd dyvedeep/*.h dyvedeep/kernels/*.h) setup.py
CORES ?= 32

.PHONY: setup build test test-fast test-avx2 fma-spills check-neon test-pi test-slurm all lint clean proto bench

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

# The AVX2/FMA kernels (their own tile shapes) as an AVX2-only host builds them, even on an
# AVX-512 host: a copy of the package and tests built with DYVEDEEP_ISA=avx2 (-mno-avx512f) in
# build/avx2 and tested there (pytest puts that copy first on the path); then the spill check.
AVX2_DIR := build/avx2
test-avx2: setup
	rm -rf $(AVX2_DIR) && mkdir -p $(AVX2_DIR)
	cp -r setup.py pyproject.toml dyvedeep tests $(AVX2_DIR)/
	rm -f $(AVX2_DIR)/dyvedeep/*.so $(AVX2_DIR)/dyvedeep/_kernels.c
	cd $(AVX2_DIR) && DYVEDEEP_ISA=avx2 $(abspath $(BIN))/python setup.py --quiet build_ext --inplace
	cd $(AVX2_DIR) && DYVEDEEP_MIRROR=$${DYVEDEEP_MIRROR:-$(abspath ..)/shared/mirror} DYVEDEEP_EXPECT_ISA=avx2 \
	  $(abspath $(BIN))/python -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_engine.py tests/test_knobs.py tests/test_sfma_alone.py
	$(BIN)/python tools/fma_spills.py $(AVX2_DIR)/dyvedeep/_kernels*.so --max 0

# Vector FMAs whose accumulator is spilled to the stack, in the in-place build (tools/fma_spills.py).
fma-spills: build
	$(BIN)/python tools/fma_spills.py dyvedeep/_kernels*.so --max 0

# The NEON kernels compiled by a cross compiler (Debian: gcc-aarch64-linux-gnu), warnings as
# errors, then their spill check; the emulated board (make test-pi) runs them.
AARCH64_CC ?= aarch64-linux-gnu-gcc
check-neon: build
	@command -v $(AARCH64_CC) >/dev/null || { echo "check-neon: no $(AARCH64_CC) (apt-get install gcc-aarch64-linux-gnu)"; exit 1; }
	mkdir -p build/neon
	$(AARCH64_CC) -O3 -fopenmp -fno-fast-math -Wno-psabi -Wall -Werror -Wno-unused-function -fPIC \
	  -I$$($(BIN)/python -c "import sysconfig; print(sysconfig.get_paths()['include'])") \
	  -I$$($(BIN)/python -c "import numpy; print(numpy.get_include())") -Idyvedeep \
	  -DNPY_NO_DEPRECATED_API=NPY_1_7_API_VERSION -c dyvedeep/_kernels.c -o build/neon/_kernels.o
	$(BIN)/python tools/fma_spills.py build/neon/_kernels.o --objdump $(AARCH64_CC:gcc=objdump) --max 0

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
