"""eval.data.load_hf: loading-script repos (Winoground, Stanford Cars, FGVC-Aircraft) through their parquet
conversion (`refs/convert/parquet`), online or from a local snapshot, and an error that says what to do."""
from __future__ import annotations

from pathlib import Path

import pytest

from eval.data import PARQUET_REVISION, load_hf
from vlm.errors import UserError


def _parquet(path: Path, rows: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows), path)


def test_local_parquet_conversion_snapshot_is_read(tmp_path):
    # the layout of a repo's refs/convert/parquet branch: <config>/<split>/0000.parquet
    snap = tmp_path / "winoground"
    _parquet(snap / "default" / "test" / "0000.parquet", {"id": [0, 1], "caption_0": ["a", "b"]})
    _parquet(snap / "default" / "train" / "0000.parquet", {"id": [5], "caption_0": ["c"]})
    ds = load_hf(str(snap), "test")
    assert ds["caption_0"] == ["a", "b"]
    with pytest.raises(UserError, match=r"splits \['test', 'train'\], not 'val'"):
        load_hf(str(snap), "val")


def test_older_parquet_layout_and_config_choice(tmp_path):
    snap = tmp_path / "cars"
    _parquet(snap / "a" / "cars-test.parquet", {"label": [1, 2, 3]})
    _parquet(snap / "b" / "partial-test" / "0000.parquet", {"label": [9]})
    with pytest.raises(UserError, match=r"configs \['a', 'b'\]; set the task's `config`"):
        load_hf(str(snap), "test")
    assert load_hf(str(snap), "test", "a")["label"] == [1, 2, 3]
    assert load_hf(str(snap), "test", "b")["label"] == [9]


def test_script_dataset_error_says_what_to_do(tmp_path, monkeypatch):
    local = tmp_path / "winoground"
    local.mkdir()
    (local / "winoground.py").write_text("import datasets\n")
    with pytest.raises(UserError, match=rf"loading-script dataset.*--revision {PARQUET_REVISION} --local-dir DIR"):
        load_hf(str(local), "test")

    import datasets

    calls = []

    def fake_load(source, config=None, split=None, revision=None):
        calls.append(revision)
        if revision is None:
            raise RuntimeError("Dataset scripts are no longer supported, but found winoground.py")
        if source == "facebook/winoground":
            return ["parquet rows"]
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert load_hf("facebook/winoground", "test") == ["parquet rows"]  # retried on the parquet conversion
    assert calls == [None, PARQUET_REVISION]
    with pytest.raises(UserError, match=r"huggingface-cli download HuggingFaceM4/FGVC-Aircraft --repo-type dataset "
                                        rf"--revision {PARQUET_REVISION}.*offline"):
        load_hf("HuggingFaceM4/FGVC-Aircraft", "test")
