# make demo : create .venv (if missing), install purireid and run the whole pipeline on the
#             embedded default (synthetic dataset, CPU-sized).
# make test : the same set-up, then the test suite.
# make report: the HTML report (report.html) of the last run; make rulegraph: docs/rulegraph.svg.
# Snakemake applies the workflow profile profiles/default/ by itself (no --profile needed).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.purireid-installed
PYTEST_ARGS ?=
SNAKEMAKE_ARGS ?=

.PHONY: demo test setup report rulegraph

demo: $(STAMP)
	$(BIN)/snakemake $(SNAKEMAKE_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS) || { rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests (exit 5): nothing was tested" >&2; fi; \
	  exit $$rc; }

setup: $(STAMP)

report: $(STAMP)
	$(BIN)/snakemake --report report.html $(SNAKEMAKE_ARGS)

rulegraph: $(STAMP)
	@command -v dot >/dev/null || { echo "make rulegraph needs Graphviz's dot (Debian: apt-get install graphviz)" >&2; exit 1; }
	$(BIN)/snakemake --rulegraph > docs/rulegraph.dot.tmp
	dot -Tsvg docs/rulegraph.dot.tmp -o docs/rulegraph.svg.tmp && mv docs/rulegraph.svg.tmp docs/rulegraph.svg
	rm -f docs/rulegraph.dot.tmp

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -e '.[test]'
	touch $@
