# Two commands on a fresh machine with Python >= 3.10: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?= -n 2

.PHONY: demo test test-fast bench bench-gpu lint constraints clean gui-deps judges docs figures

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev,napari,docs,nnunet]"
	@# nnunetv2 brings torchvision (through timm, for architectures we never build); its
	@# PyPI wheel does not load against the CPU torch, and hirescam3d must not use it.
	$(BIN)/python -m pip uninstall -q -y torchvision
	touch $@

gui-deps:
	@bash .ci/install-gui-deps.sh

# The outside judges of the DICOM outputs (dciodvfy from dicom3tools, dcm2niix), installed
# with apt-get where root; without them tests/io/test_dicom_validators.py skips, saying why.
judges:
	@bash .ci/install-judges.sh

# The main job on the bundled sample CT with the bundled demo model.
demo: $(STAMP)
	$(BIN)/hirescam3d explain sample_data/sample_chest_ct.nii.gz --finding atelectasis \
		--method hirescam --method gradcam --organs sample_data/sample_chest_organs.nii.gz \
		--out out/demo --png --force
	@echo "demo outputs: $(CURDIR)/out/demo (open sample_data/sample_chest_ct.nii.gz with the" \
		"*_atelectasis_*.nii.gz maps as overlays, or run: $(BIN)/hirescam3d view" \
		"sample_data/sample_chest_ct.nii.gz -e out/demo/sample_chest_ct_atelectasis_hirescam.nii.gz)"

# GUI tests need a real (virtual) X display: napari canvases need OpenGL, which
# Qt's offscreen platform lacks. Without xvfb-run they skip themselves.
test: $(STAMP) gui-deps judges
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(MAKE) docs
	if command -v xvfb-run >/dev/null 2>&1; then \
		xvfb-run -a -s "-screen 0 1280x1024x24" $(BIN)/python -m pytest $(PYTEST_ARGS); \
	else $(BIN)/python -m pytest $(PYTEST_ARGS); fi

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow and not gui" $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_core.py --out benchmarks/results.json
	$(BIN)/python benchmarks/bench_methods.py --out benchmarks/results.json
	$(BIN)/python benchmarks/bench_scale.py --repeats 3 --out benchmarks/results.json
	$(BIN)/python benchmarks/demo_quality.py --first-seed 0 --count 200 --results benchmarks/results.json
	$(BIN)/python benchmarks/paper_tables.py --out docs/results --results benchmarks/results.json
	$(BIN)/python benchmarks/seg_quality.py --first-seed 0 --count 100 --results benchmarks/results.json
	$(BIN)/python benchmarks/bench_sliding.py --out benchmarks/results.json
	$(BIN)/python benchmarks/bench_nnunet.py --out benchmarks/results.json
	$(BIN)/python benchmarks/bench_bundle.py --out benchmarks/results.json
	$(BIN)/python benchmarks/bench_write.py --out benchmarks/results.json
	$(BIN)/python benchmarks/bench_batch.py --out benchmarks/results.json

# On a machine with a CUDA GPU: explain vs inference, full AxialNet, sliding-window demo_seg.
bench-gpu: $(STAMP)
	$(BIN)/python benchmarks/bench_gpu.py --device cuda --out benchmarks/results_gpu.json

# The documentation site (MkDocs + Material + mkdocstrings); any warning fails the build.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

# Every figure of the docs, from the shipped models and phantoms; the napari screenshots
# need a (virtual) X display, so they are made only where xvfb-run exists.
figures: $(STAMP) gui-deps
	if command -v xvfb-run >/dev/null 2>&1; then \
		xvfb-run -a -s "-screen 0 1280x1024x24" $(BIN)/python docs/make_figures.py \
			--out docs/images --napari; \
	else $(BIN)/python docs/make_figures.py --out docs/images; fi

lint: $(STAMP)
	$(BIN)/ruff check .

constraints: $(STAMP)
	{ head -2 constraints.txt; $(BIN)/python -m pip freeze --exclude hirescam3d \
		| sed 's/^torch==\([0-9.]*\)+cpu$$/torch==\1/'; } > constraints.tmp && mv constraints.tmp constraints.txt

clean:
	rm -rf $(VENV) build dist site *.egg-info .pytest_cache .import_linter_cache
