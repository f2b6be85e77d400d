# The README's two commands: `make demo` and `make test`. Both install what they need
# into .venv at the repository root and are safe to run again.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
# A CPU build of this exact torch lies on the build machines' disk; any other version
# (or a plain `torch` requirement resolved first) pulls a multi-GB CUDA build.
TORCH  := torch==2.13.0

.PHONY: install dev demo test test-all bench bench-build bench-peers bench-memory bench-hosted bench-migrate bench-resync bench-gateway bench-journal bench-query bench-serve bench-adapters bench-ray bench-extra clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e .
	touch $@

$(VENV)/.dev: $(VENV)/.installed
	$(PIP) install -q -e '.[dev,ray,plot]'
	touch $@

install: $(VENV)/.installed
dev: $(VENV)/.dev

demo: install
	$(VENV)/bin/embedpipe -c configs/embedpipe.toml ingest examples/corpus/docs.jsonl --index demo
	$(VENV)/bin/embedpipe -c configs/embedpipe.toml ingest examples/notes --index demo
	@echo; echo '$$ embedpipe search "which planet has a runaway greenhouse effect?" --index demo -k 3'
	@$(VENV)/bin/embedpipe -c configs/embedpipe.toml search "which planet has a runaway greenhouse effect?" --index demo -k 3
	@echo; echo '$$ embedpipe search "why must I re-embed when my embedding model is retired?" --index demo -k 3'
	@$(VENV)/bin/embedpipe -c configs/embedpipe.toml search "why must I re-embed when my embedding model is retired?" --index demo -k 3
	@echo; echo '$$ embedpipe sync --index notes   # examples/notes, chunked, kept in step with the folder'
	@$(VENV)/bin/embedpipe -c configs/embedpipe.toml sync --index notes
	@echo; echo '$$ embedpipe search "why re-embed when a model is retired?" --index notes -k 3 --group-by-doc'
	@$(VENV)/bin/embedpipe -c configs/embedpipe.toml search "why re-embed when a model is retired?" --index notes -k 3 --group-by-doc
	@echo; echo '$$ embedpipe status'
	@$(VENV)/bin/embedpipe -c configs/embedpipe.toml status

test: dev
	$(PY) -m pytest

test-all: dev
	$(PY) -m pytest -m ''

# Every benchmark, one after the other (about 1.6 hours on 2 cores, 35 minutes of them bench-scale); each prints a table
# and writes JSON with the machine info under bench/results/.
bench: bench-build bench-peers bench-memory bench-hosted bench-migrate bench-resync bench-gateway bench-journal bench-query bench-serve bench-adapters bench-scale

bench-extra: dev
	$(PIP) install -q -e '.[dev,bench]'

bench-build: dev
	$(PY) bench/ingest_vs_encode.py --rounds 3

bench-peers: bench-extra
	$(PY) bench/build_vs_peers.py --rounds 4

bench-memory: bench-extra
	$(PY) bench/memory_flat.py

bench-hosted: dev
	$(PY) bench/hosted_tpm.py

bench-migrate: dev
	$(PY) bench/migrate_vs_encode.py --rounds 3

bench-resync: bench-extra
	$(PY) bench/resync_noop.py --rounds 3

bench-gateway: dev
	$(PY) bench/gateway_overhead.py

bench-journal: dev
	$(PY) bench/qdrant_journal.py --rounds 6

bench-query: dev
	$(PY) bench/query_overhead.py --passes 3

# Search through `embedpipe serve` against Index.search in-process, then 32 clients with and
# without a documents writer (11 minutes on a busy 2-core machine, half of it the MiniLM searches of part 1).
bench-serve: dev
	$(PY) bench/serve.py

# Query adapters on Cranfield: old native, each kind of adapter, new native after the migration,
# for static <-> MiniLM and a hosted (loopback) model retired mid-run (12 minutes on 2 cores).
bench-adapters: dev
	$(PY) bench/adapters.py

# A migration's backfill in process against Ray on the same machine (Cranfield static ->
# MiniLM, and 100k synthetic documents static -> static), alternating; not in `bench`
# (about 26 minutes on a busy 2-core machine). RAY_FLAGS="--device cuda --gpus-per-worker 1
# --ray-configs 4x1 --target local-bge" on a 4-GPU machine adds documents/s per GPU.
bench-ray: dev
	$(PY) bench/ray_backfill.py --rounds 2 --ray-configs 1x2 $(RAY_FLAGS)

# 100k documents on Qdrant Edge and on the old local mode, then 1M on Edge (about 1.5 hours on 2 cores).
# SCALE_FLAGS="--memory-limit 3G" builds in a 3 GiB memory cgroup (needs a writable cgroup).
bench-scale: dev
	$(PY) bench/scale.py --ef-sweep 128,512,1024,2048 $(SCALE_FLAGS)

clean:
	rm -rf .embedpipe .pytest_cache
