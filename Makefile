# Dev/CI entry points. Everything runs from the project-local .venv.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
CONFIG ?= configs/pretrain.py
SHELL  := /bin/bash

REPRO  := runs/toy
REF    := checkpoints/toy

.PHONY: install browser test train quickstart demo screenshot reproduce clean

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# Re-install only when the packaging files change. The grep drops pip's
# per-package noise about local mirror index folders that lack a project.
$(STAMP): setup.py constraints.txt | $(PY)
	set -o pipefail; \
	$(PIP) install -q --disable-pip-version-check -c constraints.txt -e '.[test,torch,app]' 2>&1 \
	  | { grep -v "is ignored: it is neither a file nor a directory" || true; }
	touch $@

# Tests that need several host devices set XLA_FLAGS themselves. Two workers (pytest-xdist,
# TEST_WORKERS=0 for one process), each taking whole files so module fixtures are built once.
# pytest exits 5 when it collects nothing; that must fail, loudly.
TEST_WORKERS ?= 2
test: $(STAMP) browser
	@rc=0; $(PY) -m pytest -q -rs --durations=15 -n $(TEST_WORKERS) --dist loadfile tests || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: FAIL: pytest collected no tests (exit 5)" >&2; fi; \
	exit $$rc

# Debian's chromium for the web app's browser test (tests/test_app.py; playwright's own browser
# download is not used). Installed with apt-get when missing; if that fails, so does make test.
CHROMIUM ?= /usr/bin/chromium
browser:
	@[ -x $(CHROMIUM) ] || { echo "installing chromium for the browser test (apt-get)"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q chromium >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }; }

# The web app on http://127.0.0.1:7860 over the shipped toy student.
demo: $(STAMP)
	$(PY) -m anchoredit_jax.app --checkpoint $(REF)/distill

# docs/app.png, the README's picture of the app, from the browser test.
screenshot: $(STAMP) browser
	ANCHOREDIT_APP_SCREENSHOT=docs/app.png $(PY) -m pytest -q tests/test_app.py -k browser

# Stage-1 training, default toy preset.
train: $(STAMP)
	$(PY) -m anchoredit_jax.train --config=$(CONFIG)

# A 16-turn session, the multi-turn benchmark and a report from the reference checkpoints
# (checkpoints/toy) in a few CPU minutes: runs/quickstart/report.md.
quickstart: $(STAMP)
	$(PY) -m anchoredit_jax.quickstart --workdir runs/quickstart

# The toy pipeline from scratch: stages 1-3 (each resumes if rerun; a finished one is skipped;
# each stage reads the one before from its default init_from, runs/toy/<previous stage>),
# their export as reference checkpoints into checkpoints/toy, then the multi-turn benchmark.
reproduce: $(STAMP)
	@set -eo pipefail; mkdir -p $(REPRO); start=$$(date +%s); \
	for stage in pretrain causal distill; do \
	  echo "== stage $$stage: $(REPRO)/$$stage (log $(REPRO)/$$stage.log)"; \
	  $(PY) -m anchoredit_jax.train --config=configs/$$stage.py --workdir=$(REPRO)/$$stage \
	    2>&1 | tee -a $(REPRO)/$$stage.log; \
	done; \
	echo "reproduce: training took $$(( ($$(date +%s) - start) / 60 )) min (this invocation)"; \
	for stage in pretrain causal distill; do \
	  $(PY) -m anchoredit_jax.export --run=$(REPRO)/$$stage --out=$(REF)/$$stage; \
	done; \
	$(PY) -m benchmark.multiturn --weights=$(REF) --runs=$(REPRO) --baseline-sequences=32 \
	  --out=benchmark/results/multiturn/latest; \
	echo "reproduce: done in $$(( ($$(date +%s) - start) / 60 )) min"

clean:
	rm -rf $(VENV) runs/
