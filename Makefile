# Everything creates its own environment in .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel; set TORCH_SPEC="torch" (or a CUDA build) on a GPU machine.
TORCH_SPEC ?= torch==2.13.0
MODEL ?=
# make lab: where JupyterLab listens, and extra `jupyter lab` options, set on make's command
# line (not read from the environment, where PORT or HOST often mean something else),
# e.g. make lab HOST=0.0.0.0 PORT=8899 ARGS=--no-browser on a remote machine.
HOST = localhost
PORT = 8888
ARGS =
# make lab serves the repository (helpers/ one click away) and opens the first notebook.
FIRST_NOTEBOOK = notebooks/01_dataset_formatting.ipynb
# make grade SUBMISSION=path.ipynb (several: SUBMISSION="a.ipynb b.ipynb"); TIMEOUT: seconds per cell.
SUBMISSION =
TIMEOUT = 900
NBGRADER_SERVER_EXTENSIONS = $(addprefix nbgrader.server_extensions.,formgrader assignment_list course_list validate_assignment)

.PHONY: setup lab test test-fast lint finetune benchmarks notebooks student grade clean

# Checked before anything is built: one line naming what to install.
# (Runs on whatever $(PYTHON) is, so no f-strings.)
define SETUP_CHECK
import sys
v = sys.version_info
if v < (3, 10):
    sys.exit("make setup: the course needs Python 3.10 or newer, but $(PYTHON) is %d.%d; install python3.10+ and run: make setup PYTHON=python3.12" % (v[0], v[1]))
try:
    import ensurepip, venv
except ImportError:
    sys.exit("make setup: Python's venv module is missing; install it (Debian/Ubuntu: apt install python3-venv, or python%d.%d-venv) and run make setup again" % (v[0], v[1]))
endef
export SETUP_CHECK

$(VENV)/.installed: pyproject.toml requirements.txt
	@command -v $(PYTHON) >/dev/null || { echo "make setup: $(PYTHON) not found; install Python 3.10+ or name it: make setup PYTHON=/path/to/python3" >&2; exit 1; }
	@$(PYTHON) -c "$$SETUP_CHECK"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	@# nbgrader (make student, make grade) is used from the command line only: its JupyterLab
	@# menus and server extensions stay off, so learners get the plain JupyterLab.
	$(VENV)/bin/jupyter server extension disable --sys-prefix $(NBGRADER_SERVER_EXTENSIONS) >/dev/null 2>&1
	$(VENV)/bin/jupyter labextension disable @jupyter/nbgrader >/dev/null 2>&1
	touch $@

# The notebooks' kernel ("python3") is this environment's interpreter, by absolute path,
# whichever Jupyter opens them.
$(VENV)/.kernel: $(VENV)/.installed
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3" >/dev/null
	touch $@

setup: $(VENV)/.installed $(VENV)/.kernel  ## create .venv with everything installed

# What `make lab` prints before JupyterLab's own log (which ends with the URL and its token).
define LAB_BANNER
import os, sys
from helpers.config import MODEL_PRESETS
from helpers.runtime import DEFAULT_MODEL, course_model, describe_model
try:
    model = course_model()
except ValueError as err:
    sys.exit(f"make lab: COURSE_MODEL: {err}")
chosen = os.environ.get("COURSE_MODEL", "").strip()
names = ", ".join(name.split(" ")[0] for name in MODEL_PRESETS)
print(f"Course model: {describe_model(model)}")
print(f"  from COURSE_MODEL={chosen}" if chosen else f"  COURSE_MODEL is not set: the chapter's {DEFAULT_MODEL}, weights download on first use")
print(f"  switch: make lab COURSE_MODEL=<name>, one of {names} (tiny: offline, seconds on a CPU)")
print("JupyterLab: http://$(HOST):$(PORT)/lab/tree/$(FIRST_NOTEBOOK) (another port if that one is")
print("  taken); open the link with ?token= that JupyterLab prints below. The file browser shows the")
print("  whole repository: notebooks/ and helpers/, the code every check names. Ctrl-C twice stops it.")
endef
export LAB_BANNER

# JupyterLab refuses to start as root (Docker, cloud VMs, CI) without this flag.
ALLOW_ROOT = $(if $(filter 0,$(shell id -u)),--allow-root)

lab: setup  ## open the course in JupyterLab: make lab [HOST=0.0.0.0] [PORT=8899] [ARGS=--no-browser]
	@$(PY) -c "$$LAB_BANNER"
	JUPYTER_PREFER_ENV_PATH=1 $(VENV)/bin/jupyter lab --ip=$(HOST) --port=$(PORT) $(ALLOW_ROOT) \
		--ServerApp.root_dir="$(CURDIR)" --LabApp.default_url=/lab/tree/$(FIRST_NOTEBOOK) $(ARGS)

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

# In order, 01 to 07 (later notebooks read what earlier ones saved), each in a fresh kernel, with
# the widget state saved beside the outputs. MPLBACKEND is unset for the kernel: an exported one
# (Agg in CI shells) replaces the inline backend and every figure would be missing. Then the
# checks that the committed outputs render everywhere (tests/test_notebooks.py).
notebooks: setup  ## re-run every notebook in place (outputs committed for the web), then check them
	for nb in notebooks/0*.ipynb; do start=$$(date +%s); env -u MPLBACKEND $(VENV)/bin/jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.store_widget_state=True "$$nb" || exit 1; echo "$$nb: $$(( $$(date +%s) - start )) s wall (the notebooks' time tables quote these)"; done
	$(PY) -m pytest -q -p no:cacheprovider tests/test_notebooks.py

# The classroom editions, both by nbgrader (notebooks/INSTRUCTORS.md): the committed notebooks
# are the instructor edition; `student` writes the student edition (solutions replaced by
# stubs, hidden tests and outputs removed) to student/ (git-ignored), nbgrader's course folder
# to build/nbgrader/; `grade` autogrades submitted notebooks offline in tiny mode.
student: setup  ## the student edition of all seven notebooks in student/
	$(PY) notebooks/classroom.py student

grade: export COURSE_MODEL = tiny
grade: export HF_HUB_OFFLINE = 1
grade: export TRANSFORMERS_OFFLINE = 1
grade: setup  ## points per part: make grade SUBMISSION=path.ipynb [TIMEOUT=900 seconds per cell]
	@test -n "$(SUBMISSION)" || { echo "make grade: name the submitted notebook: make grade SUBMISSION=path/to/02_batching_and_masking.ipynb" >&2; exit 2; }
	$(PY) notebooks/classroom.py grade --timeout $(TIMEOUT) $(SUBMISSION)

clean:
	rm -rf $(VENV) .pytest_cache
