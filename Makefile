# The README's two commands are `make demo` and `make test`; both set everything up first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-fast drills bench lint clean obs-tools alerts dashboards deploy-tools deploy-manifests deploy-check

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

# The whole suite, drills included (what CI runs). The unit tests run on two workers (they are
# independent and mostly wait on subprocesses and sockets); the drills one at a time, since each
# trains real ranks on both cores and several are timing-sensitive.
test: setup obs-tools deploy-tools
	$(PY) -m pytest -q -n 2 tests/unit
	$(PY) -m pytest -q --durations=25 tests/integration tests/e2e

test-fast: setup
	$(PY) -m pytest -q -m "not drill and not integration"

drills: setup
	$(PY) -m pytest -q -m drill

# Observability binaries from apt (Debian/Ubuntu: Prometheus 2.42, Alertmanager 0.25); a no-op
# when they are installed. Without apt (or root) the tests that need them skip and say why.
obs-tools:
	@if command -v promtool >/dev/null && command -v amtool >/dev/null && command -v prometheus >/dev/null \
	   && (command -v prometheus-alertmanager >/dev/null || command -v alertmanager >/dev/null); then \
	  echo "obs-tools: present"; \
	elif command -v apt-get >/dev/null; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
	    --no-install-recommends prometheus prometheus-alertmanager >/dev/null && echo "obs-tools: installed"; \
	else echo "obs-tools: no apt-get here; promtool/amtool tests will be skipped"; fi

# promtool check/test rules, amtool check-config, dashboards vs schemas, metrics contract.
alerts: setup obs-tools
	$(PY) -m pytest -q tests/unit/test_alerts.py tests/unit/test_dashboards.py tests/unit/test_metrics_contract.py

# Regenerate the committed dashboards and the metrics page after changing them.
dashboards: setup
	$(PY) -m alerts.dashboards.generate
	$(PY) -m supervisor.metrics_doc > docs/metrics.md

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
