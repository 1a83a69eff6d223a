# The two commands a new user needs: `make demo` (set up + main job) and `make test` (set up + tests).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := g++-aarch64-linux-gnu gcc-aarch64-linux-gnu qemu-user espeak-ng flite sox festival festvox-kdlpc16k festvox-kallpc16k pocketsphinx-testdata alsa-utils
PYTEST_ARGS ?=

.PHONY: setup apt venv arm-runtime demo test test-slow clean

setup: apt venv arm-runtime

# Debian packages: the aarch64 cross compiler and qemu for the Raspberry Pi targets, TTS engines for speech data.
apt:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing apt packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

venv: $(VENV)/.installed

# The aarch64 TVM runtime (from the aarch64 wheels of the installed versions) + the aarch64 runner, for the Pi targets,
# and Debian's arm64 python3 with the aarch64 onnxruntime/numpy wheels (ORT measured under qemu; ~60 MB once, cached).
arm-runtime: apt venv
	$(VENV)/bin/nativeq setup-arm

demo: setup
	$(VENV)/bin/nativeq demo

test: setup
	$(PY) -m pytest -n 2 $(PYTEST_ARGS)

test-slow: setup
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info demo-out
