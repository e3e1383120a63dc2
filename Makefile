# `make run` and `make test` work on a fresh machine: both build on `make install`.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= conf/default.toml
STAMP := $(VENV)/.samullm-installed

.PHONY: install run test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if nvidia-smi >/dev/null 2>&1; then \
		$(PY) -m pip install -q -e '.[gpu,ray,test]'; \
	else \
		$(PY) -m pip install -q 'torch==2.13.0' -e '.[cpu,ray,test]'; \
	fi
	# PyPI's torchvision breaks `import transformers` next to the CPU torch ("torchvision::nms does not exist").
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec || true
	# the status page's browser tests (tests/gateway/test_status_page.py) drive headless chromium
	if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && \
			[ "$$(id -u)" = 0 ]; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
	fi
	touch $(STAMP)

run: install
	$(VENV)/bin/samullm serve --config $(CONFIG) --make-demo-models

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

clean:
	rm -rf .samullm .pytest_cache
