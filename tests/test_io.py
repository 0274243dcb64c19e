"""vlm.io: atomic writes keep the mode a plain `open(..., "w")` would give (issue 13: results were 0600)."""
from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from vlm.io import atomic_save_safetensors, atomic_write_json, atomic_write_text


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_writes_follow_the_umask(tmp_path, umask):
    # a fresh interpreter so the umask is the one the process starts with, as on a cluster node
    code = (
        "import sys, torch\n"
        "from vlm.io import atomic_write_text, atomic_write_json, atomic_save_safetensors\n"
        "d = sys.argv[1]\n"
        "atomic_write_text(d + '/recipe.yaml', 'a: 1\\n')\n"
        "atomic_write_json(d + '/results.json', {'x': 1})\n"
        "atomic_save_safetensors(d + '/w.safetensors', {'w': torch.zeros(2)})\n"
        "open(d + '/plain.txt', 'w').close()\n"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True,
                   preexec_fn=lambda: os.umask(umask))
    expected = 0o666 & ~umask
    assert _mode(tmp_path / "plain.txt") == expected
    for name in ("recipe.yaml", "results.json", "w.safetensors"):
        assert _mode(tmp_path / name) == expected, name


def test_atomic_write_replaces_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "results.json"
    atomic_write_json(target, {"a": 1})
    atomic_write_text(target, "{}\n")
    assert target.read_text() == "{}\n"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_append_jsonl_records_one_write_and_torn_line_skipped(tmp_path):
    from vlm.io import append_jsonl_records, read_jsonl

    path = tmp_path / "p.jsonl"
    append_jsonl_records(path, [{"id": 1}, {"id": 2}])
    append_jsonl_records(path, [])
    with open(path, "a") as f:
        f.write('{"id": 3, "tor')  # a crash mid-batch
    assert [r["id"] for r in read_jsonl(path)] == [1, 2]
