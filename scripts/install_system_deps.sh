#!/usr/bin/env bash
# Debian packages the tests need; installs only what is missing (root or sudo).
set -euo pipefail
packages=(dataset-fashion-mnist chromium chromium-driver postgresql)  # chromium: the browser test of `aevae ui`; postgresql: the sweep tests start a throwaway server
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "installing Debian packages: ${missing[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
