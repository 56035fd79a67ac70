#!/usr/bin/env bash
# Installs what lit-methods needs on a fresh Debian machine: the offline Fashion-MNIST files (Debian's
# dataset-fashion-mnist, used by the quickstart and the real-data tests) and the package with its dev extras.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq dataset-fashion-mnist
fi

python3 -m pip install --quiet --disable-pip-version-check -e '.[dev]'
