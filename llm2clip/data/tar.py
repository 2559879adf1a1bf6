"""Tar shards: telling a shard cut short from a whole one (tarfile itself cannot)."""

from __future__ import annotations


def tar_end_problem(path: str) -> list[Exception]:
    """tarfile (so webdataset) takes a shard cut short inside a header, or at a member boundary, for its
    end. A whole shard ends with tar's end-of-archive marker, two zero blocks (padding after it is zeros
    too), so its last 1 KiB is zero; a cut leaves a header or member bytes there. -> [the problem] or []."""
    marker = 2 * 512
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        f.seek(max(size - marker, 0))
        if f.read() == bytes(marker):
            return []
    return [OSError(f"the last {marker} bytes are not tar's end-of-archive blocks: the shard was cut short")]
