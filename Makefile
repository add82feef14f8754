# answerfirst — every target works on a fresh machine: the venv is created on first use.
PYTHON_BOOT ?= python3
VENV        ?= .venv
TORCH       ?= torch==2.13.0
# llama.cpp is compiled here, for this CPU (AVX-512/VNNI where present: Q4_K_M scores 1.7x faster than
# the portable AVX2 build on the 2-core Xeon of bench/results), ONCE: into a wheel kept in $(WHEELS),
# which the main venv and the edge-install test's fresh [gguf] venv both install. --no-cache-dir:
# pip would otherwise reuse a wheel it cached from an earlier build with other flags. A portable
# build for a shared image: make LLAMA_CMAKE_ARGS=-DGGML_NATIVE=OFF
LLAMA_CPP        ?= llama-cpp-python>=0.3.36
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=ON
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.installed
WHEELS      := $(VENV)/wheels
LLAMA_WHEEL := $(WHEELS)/.llama-cpp-python
CONSTRAINT  := $(VENV)/torch-constraint.txt

# Default outputs of the main job (`make distill export`); override on the command line.
ARTIFACTS ?= artifacts
STUDENT_OUT ?= $(ARTIFACTS)/student
ONNX_OUT    ?= $(ARTIFACTS)/onnx
GGUF_OUT    ?= $(ARTIFACTS)/gguf
GGUF_QUANTS ?= f16,q8_0,q4_k_m
# Real-use overrides for `make distill`: a teacher, a student and pairs of your own.
TEACHER ?=
STUDENT ?=
DATA    ?=
MODEL   ?= $(STUDENT_OUT)
# `make serve`: the rerank HTTP service on the ONNX export (int8 where its parity passed).
SERVE_MODEL ?= $(ONNX_OUT)
SERVE_ARGS  ?=
PYTEST_ARGS ?=

.PHONY: help venv test distill ablation export export-onnx export-gguf demo serve bench bench-quick lint clean

help:
	@echo "make distill export   # the main job: sample data -> teacher -> student -> ONNX + GGUF"
	@echo "make test             # the test suite (what CI runs)"
	@echo "make ablation         # after distill: gold vs hard vs KL vs KL+trace students, BM25 (README table)"
	@echo "make demo | serve | bench | lint | clean"

venv: $(STAMP)

$(PY):
	$(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(LLAMA_WHEEL): | $(PY)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip wheel -q --no-cache-dir --no-deps -w $(WHEELS) "$(LLAMA_CPP)"
	touch $@

# torch goes in first and pinned, and llama-cpp-python at the version of the wheel built above (the
# constraint keeps every later install on both), then the package with every extra. Last, the wheels
# of the edge installs (base, [onnx], [gguf]) are saved to $(WHEELS): tests/test_edge_install.py
# builds fresh venvs from them with no index.
$(STAMP): pyproject.toml $(LLAMA_WHEEL) | $(PY)
	echo "$(TORCH)" > $(CONSTRAINT)
	ls $(WHEELS)/llama_cpp_python-*.whl | sed -E 's|.*/llama_cpp_python-([^-]+)-.*|llama-cpp-python==\1|' >> $(CONSTRAINT)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -c $(CONSTRAINT) --find-links $(WHEELS) -e ".[all,dev]"
	$(PY) -m pip wheel -q -c $(CONSTRAINT) --find-links $(WHEELS) -w $(WHEELS) ".[onnx,gguf]"
	rm -f $(WHEELS)/answerfirst-*.whl
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

distill: $(STAMP)
	$(PY) -m answerfirst.cli distill-default --out $(STUDENT_OUT) --work $(ARTIFACTS)/work \
		$(if $(TEACHER),--teacher $(TEACHER)) $(if $(STUDENT),--student $(STUDENT)) $(if $(DATA),--data $(DATA))

# What first-token distillation buys: four students on the default run's data (after `make distill`).
ablation: distill
	$(PY) -m answerfirst.cli ablation --work $(ARTIFACTS)/work --out $(ARTIFACTS)/ablation

export: export-onnx export-gguf

export-onnx: $(STAMP)
	$(PY) -m answerfirst.cli export onnx --model $(MODEL) --out $(ONNX_OUT)

export-gguf: $(STAMP)
	$(PY) -m answerfirst.cli export gguf --model $(MODEL) --out $(GGUF_OUT) --quant $(GGUF_QUANTS)

demo: $(STAMP)
	$(PY) -m answerfirst.cli demo --model $(MODEL)

serve: $(STAMP)
	$(PY) -m answerfirst.cli serve --model $(SERVE_MODEL) $(SERVE_ARGS)

bench: $(STAMP)
	$(PY) -m answerfirst.cli bench

bench-quick: $(STAMP)
	$(PY) -m answerfirst.cli bench --quick

lint: $(STAMP)
	$(PY) -m ruff check answerfirst tests

clean:
	rm -rf $(ARTIFACTS) .pytest_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
