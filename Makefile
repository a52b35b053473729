# Two commands for a user: `make demo` and `make test`. Each creates .venv when missing.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench install clean

$(VPY):
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install --upgrade pip setuptools wheel

$(STAMP): $(VPY) pyproject.toml
	$(VPY) -m pip install -e '.[demo,test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sparse-compile demo

test: $(STAMP)
	$(VPY) -m pytest -q

bench: $(STAMP)
	$(VPY) -m bench.quick

clean:
	rm -rf $(VENV) build *.egg-info demo-out
