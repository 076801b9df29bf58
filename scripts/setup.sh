#!/usr/bin/env bash
# Create .venv with the CPU build of torch 2.13.0 (pinned: any other spec pulls CUDA wheels) and bctkit,
# then install the CJK fonts of the glyphs dataset (apt-get, when root and missing).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"

# CJK fonts for the glyphs dataset: Debian packages listed in bctkit.data.glyphs.FONT_PACKAGES.
# Installed with apt-get when missing and we are root; otherwise one line says what to install.
FONTS=$(.venv/bin/python -c "from bctkit.data.glyphs import FONT_PACKAGES; print(' '.join(FONT_PACKAGES))")
MISSING=""
for pkg in $FONTS; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || MISSING="$MISSING $pkg"
done
if [ -n "$MISSING" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        { DEBIAN_FRONTEND=noninteractive apt-get update -qq \
            && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $MISSING; } >/dev/null 2>&1 \
            || echo "setup.sh: apt-get failed; the glyphs dataset needs: apt-get install$MISSING"
    else
        echo "setup.sh: the glyphs dataset needs CJK fonts: sudo apt-get install$MISSING"
    fi
fi
