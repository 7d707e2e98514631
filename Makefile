# scam-back: `make run` installs everything and starts the milter on the shipped config;
# `make test` installs everything and runs the whole suite; `make setup` only installs.

PYTHON   ?= /usr/bin/python3
VENV     ?= .venv
RUN_DIR  ?= /var/spool/scam
RUN_USER ?= nobody

.PHONY: setup run test bench clean apt

setup: $(VENV)/.installed

# Debian packages (libmilter, Postfix without a system MTA, an unpacked sendmail for the
# tests): installed only when missing, so a ready machine pays a few dpkg look-ups.
apt:
	sh tools/install-debian-deps

$(VENV)/.installed: setup.cfg setup.py pyproject.toml | apt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip setuptools wheel
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

run: setup
	install -d -o $(RUN_USER) -m 0755 $(RUN_DIR)
	$(VENV)/bin/scam-back -t -f etc/scam.conf
	exec $(VENV)/bin/scam-back -p inet:8900@127.0.0.1 -u $(RUN_USER) -f etc/scam.conf \
	  -P $(RUN_DIR)/scam-back.pid

test: setup
	$(VENV)/bin/python -m pytest -q

# Benchmarks print tables (nothing is asserted); BENCH_FLAGS=--write also writes bench/results.md,
# BENCH_FLAGS=--quick is a short smoke run. Needs root (Postfix, -u nobody).
bench: setup
	$(VENV)/bin/python bench/run_all.py $(BENCH_FLAGS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
