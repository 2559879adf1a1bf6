"""What a pipeline step read, recorded so `llm2clip run` reuses a step only while its inputs are unchanged.

A step's stamp is its config values plus, for every path it reads (a file, a folder, a brace/glob
pattern), each file's size and modification time. `run` keeps the stamps of finished steps in
`<run.out_dir>/step_inputs.json`; a step whose stamp differs (an edited file, another path, a changed
key) runs again, and so does one with no stamp (a run from before stamps were kept).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

LEDGER = "step_inputs.json"


def file_stamps(pattern: str | None) -> list | None:
    """[[path, size, mtime_ns], ...] of every file `pattern` names (folders walked); None for None."""
    from .data.readers import expand_paths

    if pattern is None:
        return None
    out = []
    for path in expand_paths(str(pattern)) or [str(pattern)]:  # a hub id or a missing path: its name
        p = Path(path)
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p] if p.is_file() else []
        out += [[str(f), (st := f.stat()).st_size, st.st_mtime_ns] for f in files] or [[path, None, None]]
    return out


def stamp(values: dict, paths: dict) -> dict:
    """`values`: config values (dataclasses allowed); `paths`: name -> pattern, list of patterns or None."""
    def plain(v):
        return dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v

    read = {k: [file_stamps(p) for p in v] if isinstance(v, list | tuple) else file_stamps(v)
            for k, v in paths.items()}
    # a JSON round trip: what is compared with the ledger is what the ledger can hold
    return json.loads(json.dumps({"values": {k: plain(v) for k, v in values.items()}, "paths": read}, default=str))


class Ledger:
    def __init__(self, out_dir: str | os.PathLike):
        self.path = Path(out_dir) / LEDGER
        self.steps = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def current(self, step: str, expected: dict) -> bool:
        return self.steps.get(step) == expected

    def record(self, step: str, expected: dict) -> None:
        self.steps[step] = expected
        self._write()

    def forget(self, step: str) -> None:
        """Called before a step runs: a step killed midway must not look current next time."""
        if self.steps.pop(step, None) is not None:
            self._write()

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.steps, indent=1) + "\n")
        os.replace(tmp, self.path)
