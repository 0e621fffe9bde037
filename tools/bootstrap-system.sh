#!/usr/bin/env bash
# System packages infinity needs on Debian/Ubuntu: a C++ compiler and Python headers (the _C
# build), venv, libaio's headers (DeepSpeed's aio op) and util-linux's setpriv (a test).
# Installs what is missing with apt-get when run as root; otherwise prints the command to run.
set -euo pipefail
missing=()
[ -f /usr/include/libaio.h ] || missing+=(libaio-dev)
command -v g++ >/dev/null || missing+=(g++)
command -v setpriv >/dev/null || missing+=(util-linux)
PY=${PYTHON:-python3}
"$PY" -c 'import sysconfig, os, sys; sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")) else 1)' \
  || missing+=(python3-dev)
"$PY" -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
  echo "bootstrap: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  echo "bootstrap: missing system packages: ${missing[*]}" >&2
  echo "bootstrap: run  sudo apt-get install ${missing[*]}  (RHEL/Fedora: libaio-devel gcc-c++ python3-devel)" >&2
  exit 1
fi
