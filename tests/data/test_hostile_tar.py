"""Tar memory bombs (issue 17, partial): a GNU sparse member claims far more bytes than the shard holds; it
is a counted ``bad_member`` of its sample, never expanded. Peak RSS of reading it is measured in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _sparse_shard(path: Path, claimed: int) -> None:
    """A shard whose sample k000 has a GNU sparse conv.json of ``claimed`` bytes (one 512-byte data block)."""
    good = json.dumps({"conversation": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]})
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        ti = tarfile.TarInfo("k001.conv.json")
        ti.size = len(good)
        import io
        tf.addfile(ti, io.BytesIO(good.encode()))
    # hand-made GNU sparse header ('S'): realsize = claimed, one map entry (offset claimed-512, 512 bytes)
    ti = tarfile.TarInfo("k000.conv.json")
    ti.type = tarfile.GNUTYPE_SPARSE
    ti.size = 512
    buf = bytearray(ti.tobuf(format=tarfile.GNU_FORMAT))
    def octal(n: int, width: int) -> bytes:
        return (b"%0*o" % (width - 1, n)) + b"\0"
    buf[386:386 + 12] = octal(claimed - 512, 12)   # sparse[0].offset
    buf[398:398 + 12] = octal(512, 12)             # sparse[0].numbytes
    buf[483:483 + 12] = octal(claimed, 12)         # realsize
    buf[148:156] = b"        "
    chk = sum(buf[:512])
    buf[148:156] = b"%06o\0 " % chk
    data = path.read_bytes()
    end = data.rstrip(b"\0")
    end = end + b"\0" * (-len(end) % 512)
    path.write_bytes(bytes(buf[:512]) + b"x" * 512 + end + b"\0" * 1024)


def test_sparse_member_is_bad_member_and_not_expanded(tmp_path):
    shard = tmp_path / "s.tar"
    claimed = 1000 * 2**20
    _sparse_shard(shard, claimed)
    with tarfile.open(shard) as tf:
        sparse = [m for m in tf.getmembers() if m.issparse()]
        assert sparse and sparse[0].size == claimed   # tarfile sees a 1000 MiB member in a ~3 KiB file
    code = f"""
import resource, sys
sys.path.insert(0, {str(REPO)!r})
from rynnscale.data.reader import iter_tar_samples
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = [(s.key, s.bad_reason, s.bad_detail) for s in iter_tar_samples({str(shard)!r})]
print(repr(out)); print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    out, grew_mib = eval(lines[0]), int(lines[1])
    assert out[0][0] == "k000" and out[0][1] == "bad_member" and "sparse" in out[0][2], out
    assert out[1][:2] == ("k001", None)
    assert grew_mib < 64, f"reading the shard grew peak RSS by {grew_mib} MiB"
