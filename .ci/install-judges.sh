#!/usr/bin/env bash
# Install the outside judges of our DICOM outputs on a Debian machine: dciodvfy (David
# Clunie's dicom3tools, the standard's IOD validator) and dcm2niix (DICOM -> NIfTI, for
# the round trip). tests/io/test_dicom_validators.py skips, saying why, where they are missing.
set -euo pipefail
if command -v dciodvfy >/dev/null 2>&1 && command -v dcm2niix >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "install-judges: not root or no apt-get; the dciodvfy/dcm2niix tests will be skipped" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends dicom3tools dcm2niix >/dev/null
