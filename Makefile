# The README's two commands are `make demo` and `make test`; both set everything up first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-fast drills bench lint clean deploy-tools deploy-manifests deploy-check

setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps -e .
	$(PY) -m training.assets >/dev/null
	touch $(STAMP)

# The main job: a supervised 2-rank tiny CPU run with a scripted failure drill.
demo: setup
	$(VENV)/bin/titan-supervisor demo

# The whole suite, drills included (what CI runs).
test: setup deploy-tools
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not drill and not integration"

drills: setup
	$(PY) -m pytest -q -m drill

# systemd-analyze for tests/unit/test_deploy_systemd.py (the venv brings kubectl and hadolint).
deploy-tools:
	@command -v systemd-analyze >/dev/null || { apt-get update -qq && apt-get install -y -qq --no-install-recommends systemd >/dev/null; }

# Regenerate deploy/kubernetes/base/prometheusrule.yaml from alerts/rules/*.yml.
deploy-manifests: setup
	$(PY) deploy/kubernetes/generate.py alerts/rules

# Render + validate every overlay, verify the units, lint the Dockerfile.
deploy-check: setup deploy-tools
	$(PY) -m pytest -q tests/unit/test_deploy_systemd.py tests/unit/test_deploy_kubernetes.py tests/unit/test_deploy_docker.py

bench: setup
	$(PY) bench/overhead.py

clean:
	rm -rf $(VENV) .pytest_cache
