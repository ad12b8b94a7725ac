# ufo-jax: every target installs what it needs into .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ufo_jax_installed
PYTEST_WORKERS ?= 2
# The ONNX converter, without its dependency pins (they conflict with our orbax-checkpoint).
JAX2ONNX := jax2onnx==0.17.1

.PHONY: install test lint bench demo clean

$(STAMP): setup.py pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev,beam,onnx,tpu,faiss]'
	$(PY) -m pip install --quiet --no-deps $(JAX2ONNX)
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	JAX_PLATFORMS=cpu $(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --durations=15 tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .

demo: $(STAMP)
	$(PY) -m ufo_jax.demo --workdir=demo_workdir

bench: $(STAMP)
	$(PY) bench/train_step.py --variant=Ti/16 --image_size=64 --batch_size=32 --steps=10
	$(PY) bench/eval_rank.py
	$(PY) bench/input_pipeline.py
	$(PY) bench/embed.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
