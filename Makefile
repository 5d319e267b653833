# Two commands on a fresh machine with Python 3.11:  `make demo`  and  `make test`.
# Both create .venv if missing and install torch first (TORCH_SPEC), then this project with pinned deps.
# GPU users elsewhere: the default torch==2.13.0 pulls the CUDA build from PyPI, which is what you want;
# override for another platform, e.g. `make demo TORCH_SPEC="torch==2.13.0 --index-url ..."`.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
DEMO_DIR ?= .demo

BIN := $(VENV)/bin
STAMP := $(VENV)/.photon-installed

.PHONY: install browser demo test lint lint-only bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $@

demo: install
	$(BIN)/photon-swarm --peers 3 --data default --model tiny --max-steps 300 --local-steps 50 --eval-every 100 \
		--workdir $(DEMO_DIR) --fresh

# The dashboard's browser test drives Debian's chromium through chromedriver (tests/test_dashboard.py skips without
# them). Installed only when missing, as root, where apt-get exists; never fails the build.
browser:
	-@if { [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; } && [ "$$(id -u)" = 0 ] \
		&& command -v apt-get >/dev/null 2>&1; then \
		echo "installing chromium and chromium-driver (apt-get) for the dashboard's browser test"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null 2>&1 \
		|| { apt-get update -qq >/dev/null 2>&1 \
		     && apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null 2>&1; } \
		|| echo "could not install chromium; the browser test will be skipped"; \
	fi

test: install browser lint-only
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# the same lint in `make test` and `make lint`: ruff's rules and ruff's formatting
lint: install lint-only

lint-only:
	$(BIN)/ruff check photon_p2p tests bench
	$(BIN)/ruff format --check photon_p2p tests bench

bench: install
	$(BIN)/python bench/local_step.py
	$(BIN)/python bench/scale.py --quick
	-$(BIN)/python bench/wan.py --quick  # needs root (network namespaces); says so and exits 2 without
	$(BIN)/python bench/convergence.py --quick

clean:
	rm -rf $(DEMO_DIR) .pytest_cache .ruff_cache
