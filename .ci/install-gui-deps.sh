#!/usr/bin/env bash
# Install what napari's GUI tests need on a headless Debian machine: a virtual X
# server (Qt's offscreen platform has no OpenGL, so napari canvases need Xvfb)
# and the xcb libraries Qt's xcb platform plugin links against (Qt >= 6.5 also needs
# libxcb-cursor0).
set -euo pipefail
if command -v xvfb-run >/dev/null 2>&1 && ldconfig -p | grep -q libxcb-icccm.so.4 \
    && ldconfig -p | grep -q libxcb-cursor.so.0; then
    exit 0
fi
if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "install-gui-deps: not root or no apt-get; GUI tests will be skipped" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends \
    xvfb xauth libxcb-icccm4 libxcb-cursor0 libxcb-keysyms1 libxcb-xinerama0 libxcb-image0 \
    libxcb-render-util0 libxcb-randr0 libxcb-shape0 libxcb-xfixes0 libxcb-xkb1 \
    libxkbcommon-x11-0 libgl1 libegl1 libglib2.0-0 libfontconfig1 libdbus-1-3 >/dev/null
