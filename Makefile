# make demo : create .venv (if missing), install purireid and run the whole pipeline on the
#             embedded default (synthetic dataset, CPU-sized).
# make test : the same set-up, then the test suite.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.purireid-installed
PYTEST_ARGS ?=
SNAKEMAKE_ARGS ?=

.PHONY: demo test setup report rulegraph

demo: $(STAMP)
	$(BIN)/snakemake --profile profiles/default $(SNAKEMAKE_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS) || { rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests (exit 5): nothing was tested" >&2; fi; \
	  exit $$rc; }

setup: $(STAMP)

report: $(STAMP)
	$(BIN)/snakemake --profile profiles/default --report report.html $(SNAKEMAKE_ARGS)

rulegraph: $(STAMP)
	$(BIN)/snakemake --rulegraph | dot -Tsvg > docs/rulegraph.svg

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -e '.[test]'
	touch $@
