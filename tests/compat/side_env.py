"""Side environments with an older transformers, for loading our folders the way other repos do.

Each is `pip install --target .compat/transformers-<version> transformers==<version>`: transformers and
its own dependencies (tokenizers, huggingface_hub, numpy, ...) in a folder put first on PYTHONPATH, with
this environment's torch beneath them. Built once, atomically, and reused (the folder is git-ignored).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("LLM2CLIP_COMPAT_DIR", ROOT / ".compat"))


def ensure(version: str) -> Path:
    """The folder holding transformers==`version`; built on first use (about 30 s, needs PyPI)."""
    target = CACHE / f"transformers-{version}"
    stamp = target / ".complete"
    if stamp.is_file():
        return target
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-warn-conflicts",
           "--target", str(partial), f"transformers=={version}"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"could not build the transformers {version} side environment ({' '.join(cmd)}):\n"
                           f"{done.stderr[-2000:]}\nSet LLM2CLIP_SKIP_COMPAT=1 to skip these tests where PyPI "
                           "cannot be reached")
    # torch comes from this environment: a copy pulled in by a dependency would shadow it
    for stray in partial.glob("torch*"):
        shutil.rmtree(stray, ignore_errors=True)
    (partial / ".complete").write_text(version + "\n")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(partial, target)
    return target


def run(version: str, script: Path, *args: str, timeout: int = 600) -> dict:
    """Run `script` under transformers==`version`; it prints one JSON object on its last line."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ensure(version)), str(ROOT)]),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=str(ROOT))
    if done.returncode != 0:
        raise AssertionError(f"{script.name} failed under transformers {version}:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
