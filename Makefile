# Every target sets up .venv with the pinned versions in requirements.lock by itself.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint format bench cases clean

$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $@

demo: $(STAMP)
	$(BIN)/equireg demo --output-dir demo-output

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP)
	$(BIN)/python benchmarks/attention.py

# Rebuilds Testing/ from data shipped in PyPI packages (scikit-image's fundus photograph).
cases: $(STAMP)
	mkdir -p .data
	$(BIN)/pip download -q --no-deps scikit-image==0.26.0 -d .data
	$(BIN)/python -c "import glob, zipfile; zipfile.ZipFile(glob.glob('.data/scikit_image-0.26.0-*.whl')[0]).extract('skimage/data/retina.jpg', '.data')"
	$(BIN)/python Testing/make_cases.py --retina-jpg .data/skimage/data/retina.jpg

clean:
	rm -rf $(VENV) demo-output
