# The two commands a new user needs (see README): `make run` and `make test`. Both set up .venv first.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
PIPELINE_CONFIG ?= pipeline/configs/smollm2.yaml

.PHONY: setup run test lint bench clean
setup:
	@bash scripts/setup.sh

run: setup  ## the main job: the whole pipeline on the embedded default, ends with a report
	$(PYTHON) pipeline/run.py --config $(PIPELINE_CONFIG) $(ARGS)

test: setup  ## the test suite (CPU; real shared data is used when ../shared/data exists)
	$(PYTHON) -m pytest -q $(ARGS)

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	@for b in bench/bench_*.py; do echo "== $$b"; $(PYTHON) $$b || exit 1; done

clean:
	rm -rf checkpoints/data checkpoints/sft checkpoints/dpo checkpoints/pipeline
