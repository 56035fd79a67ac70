# The two commands of the README: each one installs what it needs first.
.PHONY: setup quickstart test

setup:
	bash scripts/setup.sh

# Train the baseline on Fashion-MNIST (real data, offline) and print its test accuracy.
quickstart: setup
	python3 -m lit_methods fit --config experiments/quickstart.yaml

# The whole test suite (wandb disabled; no network, no GPU needed), one pytest-xdist worker per core; the tests of
# a file stay on one worker so that their module-scoped fixtures (trained tiny models) are built once.
test: setup
	python3 -m pytest -q -n auto --dist loadfile
