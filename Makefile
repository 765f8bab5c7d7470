# Install, build and test the DyVEDeep harness. `make setup` makes .venv with everything;
# `make test` runs the tests (setting up first when needed); `make all` runs the pipeline.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
KERNELS := $(wildcard dyvedeep/*.pyx dyvedeep/*.pxd) setup.py
CORES ?= 32

.PHONY: setup build test test-fast test-pi all lint clean proto bench

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

test-pi: setup
	$(BIN)/python -m pytest -q tests/pi

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
