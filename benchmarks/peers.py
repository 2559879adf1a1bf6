"""The peer libraries the benchmark measures against, each in its own virtual environment.

    python benchmarks/peers.py            # create both (idempotent), print their interpreters

Peers pin versions our own environment cannot hold (llm2vec wants transformers 4.44.2; open_clip
needs torchvision, which does not import beside torch 2.13.0), so each lives under
runs/bench/peers/<name> and is driven as a subprocess. CI never creates them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEER_DIR = ROOT / "runs/bench/peers"

# name -> pip requirement lines. torch==2.13.0 (CPU) and torch==2.14.1 + torchvision==0.29.1 are on
# this machine's disk for Python 3.11; peft is pinned to a release that still supports transformers 4.44.
PEERS: dict[str, list[str]] = {
    "llm2vec": ["torch==2.13.0", "transformers==4.44.2", "peft==0.12.0", "llm2vec==0.2.3"],
    # open_clip_train.data (the data row's webdataset pipeline) needs its [training] extra's webdataset<=0.2.86
    "open_clip": ["torch==2.14.1", "torchvision==0.29.1", "open_clip_torch==3.3.0", "webdataset==0.2.86",
                  "braceexpand==0.1.7", "pandas==3.1.1"],
}


def python_of(name: str) -> Path:
    return PEER_DIR / name / "bin/python"


def ensure(name: str) -> Path:
    """Create the peer's venv once; a marker records the exact requirements it was built from."""
    venv, requirements = PEER_DIR / name, PEERS[name]
    marker = venv / "llm2clip-peer.json"
    if marker.is_file() and json.loads(marker.read_text()) == requirements and python_of(name).is_file():
        return python_of(name)
    print(f"[bench] creating the {name} peer environment in {venv} (first use only)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    pip = [str(python_of(name)), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, *requirements], check=True)
    marker.write_text(json.dumps(requirements))
    return python_of(name)


if __name__ == "__main__":
    for peer in PEERS:
        print(peer, ensure(peer))
