# Two commands do the whole set-up on a fresh clone: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench docs clean

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade -q pip > $(VENV)/install.log 2>&1 || (cat $(VENV)/install.log; exit 1)
	$(PY) -m pip install -c constraints.txt -e '.[train,export,bench,data,dev]' >> $(VENV)/install.log 2>&1 || (cat $(VENV)/install.log; exit 1)
	touch $@

install: $(STAMP)

# Besides ruff, the size limits of the developers' guide (tools/ is not installed with the package).
lint: install
	$(PY) -m ruff check src tests benchmarks tools
	$(PY) tools/check_sizes.py

test: install lint
	$(PY) -m pytest -q

demo: install
	$(PY) -m torchcvt info cvt_digits
	rm -rf runs/demo  # the demo starts afresh; --no-resume would keep each old run as runs/demo/previous-N
	$(PY) -m torchcvt train --output runs/demo

bench: install
	$(PY) benchmarks/bench.py --inductor --onnxruntime

# The tables of README.md and docs/pretrained.md that quote the weight catalogue.
docs: install
	$(PY) tools/update_docs.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
