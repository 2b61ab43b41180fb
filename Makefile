# Dev/CI entry points. Everything runs from the project-local .venv.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
CONFIG ?= configs/pretrain.py
SHELL  := /bin/bash

.PHONY: install test train quickstart clean

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# Re-install only when the packaging files change. The grep drops pip's
# per-package noise about local mirror index folders that lack a project.
$(STAMP): setup.py constraints.txt | $(PY)
	set -o pipefail; \
	$(PIP) install -q --disable-pip-version-check -c constraints.txt -e '.[test]' 2>&1 \
	  | { grep -v "is ignored: it is neither a file nor a directory" || true; }
	touch $@

# Tests that need several host devices set XLA_FLAGS themselves.
# pytest exits 5 when it collects nothing; that must fail, loudly.
test: $(STAMP)
	@rc=0; $(PY) -m pytest -q tests || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: FAIL: pytest collected no tests (exit 5)" >&2; fi; \
	exit $$rc

# Stage-1 training, default toy preset.
train: $(STAMP)
	$(PY) -m anchoredit_jax.train --config=$(CONFIG)

# For now identical to `train`; a later issue gives quickstart its own job.
quickstart: $(STAMP)
	$(PY) -m anchoredit_jax.train --config=$(CONFIG)

clean:
	rm -rf $(VENV) runs/
