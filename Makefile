# Two commands for a user: `make demo` and `make test`. Each creates .venv when missing.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# The oldest versions we support (what the GPU machines run): a second environment, not in CI.
OLD_VENV := .venv-oldest
OLD_PINS := torch==2.11.0 triton==3.6.0 torchvision==0.26.0 'numpy<2.4'

.PHONY: demo test test-oldest bench install clean

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

test-oldest:
	test -x $(OLD_VENV)/bin/python || $(PY) -m venv $(OLD_VENV)
	$(OLD_VENV)/bin/python -m pip install --upgrade pip 'setuptools>=70.1' wheel
	$(OLD_VENV)/bin/python -m pip install $(OLD_PINS) -e '.[test]'
	$(OLD_VENV)/bin/python -m pytest -q

bench: $(STAMP)
	$(VPY) -m bench.quick

clean:
	rm -rf $(VENV) $(OLD_VENV) build *.egg-info demo-out
