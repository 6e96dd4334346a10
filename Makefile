# Everything creates its own environment in .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel; set TORCH_SPEC="torch" (or a CUDA build) on a GPU machine.
TORCH_SPEC ?= torch==2.13.0
MODEL ?=

.PHONY: setup lab test test-fast lint finetune benchmarks notebooks clean

$(VENV)/.installed: pyproject.toml requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.installed  ## create .venv with everything installed

lab: setup  ## open the course in JupyterLab
	$(VENV)/bin/jupyter lab notebooks/

# Tests and committed notebook outputs use the offline tiny model unless told otherwise.
test notebooks: export COURSE_MODEL ?= tiny

test: setup  ## unit tests, then every notebook top to bottom under nbval
	$(PY) -m pytest tests
	$(PY) -m pytest --nbval-lax --nbval-current-env --nbval-sanitize-with notebooks/sanitize.cfg -p no:cacheprovider notebooks

test-fast: setup  ## unit tests only
	$(PY) -m pytest tests -x -q

lint: setup
	$(VENV)/bin/ruff check helpers tests benchmarks notebooks
	$(VENV)/bin/ruff format --check helpers tests benchmarks
	$(VENV)/bin/mypy

finetune: setup  ## the whole chapter headless: make finetune MODEL=tiny
	$(PY) -m helpers.finetune $(if $(MODEL),--model $(MODEL))

benchmarks: setup
	$(PY) benchmarks/bench_generation.py
	$(PY) benchmarks/bench_training.py

notebooks: setup  ## re-run every notebook in place (outputs committed for the web)
	for nb in notebooks/0*.ipynb; do $(VENV)/bin/jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.store_widget_state=False "$$nb" || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache
