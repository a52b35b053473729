"""The decision cache of "auto": what a key holds, merging with another writer, atomic saves."""
import json
import os

import pytest
import torch

from sparse_compile.compiler import cache as C


def test_key_holds_everything_a_time_depends_on():
    key = C.timing_key("cpu", torch.bfloat16, (4, 64), "condensed", {"k": 7, "weight": [32, 64]})
    d = json.loads(key)
    assert d["device"] == C.device_name("cpu") and f"x{torch.get_num_threads()} threads" in d["device"]
    assert d["dtype"] == "bfloat16" and d["input"] == [4, 64] and d["form"] == "condensed"
    assert d["params"] == {"k": 7, "weight": [32, 64]}
    assert d["versions"]["torch"] == torch.__version__ and "sparse_compile" in d["versions"]
    # Anything that changes the time changes the key; the same inputs give the same key.
    same = C.timing_key("cpu", torch.bfloat16, (4, 64), "condensed", {"weight": [32, 64], "k": 7})
    assert same == key
    for other in (C.timing_key("cpu", torch.float32, (4, 64), "condensed", {"k": 7, "weight": [32, 64]}),
                  C.timing_key("cpu", torch.bfloat16, (8, 64), "condensed", {"k": 7, "weight": [32, 64]}),
                  C.timing_key("cpu", torch.bfloat16, (4, 64), "csr", {"k": 7, "weight": [32, 64]}),
                  C.timing_key("cpu", torch.bfloat16, (4, 64), "condensed", {"k": 8, "weight": [32, 64]})):
        assert other != key


def test_save_merges_with_another_writer(tmp_path):
    a = C.DecisionCache(tmp_path)
    b = C.DecisionCache(tmp_path)  # opened before a saved: it has not seen a's entries
    a.put("ka", 1.0)
    a.save()
    b.put("kb", 2.0)
    b.save()
    data = json.loads((tmp_path / C.CACHE_FILE).read_text())
    assert data == {"ka": 1.0, "kb": 2.0}
    c = C.DecisionCache(tmp_path)
    assert c.get("ka") == 1.0 and c.get("kb") == 2.0 and c.get("kc") is None
    assert (c.hits, c.misses) == (2, 1)


def test_save_is_atomic_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    d = C.DecisionCache(tmp_path)
    d.put("k", 1.0)
    d.save()
    before = (tmp_path / C.CACHE_FILE).read_text()
    d.put("k2", 2.0)

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(C.os, "replace", crash)
    with pytest.warns(UserWarning, match="could not write"):
        d.save()
    # A failed write leaves the old file whole and removes its temporary file.
    assert (tmp_path / C.CACHE_FILE).read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == [C.CACHE_FILE]
    monkeypatch.undo()
    d.save()  # still dirty: the entry is written now
    assert json.loads((tmp_path / C.CACHE_FILE).read_text()) == {"k": 1.0, "k2": 2.0}
    assert [p.name for p in tmp_path.iterdir()] == [C.CACHE_FILE]


def test_unreadable_file_is_ignored_with_a_warning_and_rewritten(tmp_path):
    (tmp_path / C.CACHE_FILE).write_text("{not json")
    with pytest.warns(UserWarning, match="ignoring unreadable"):
        d = C.DecisionCache(tmp_path)
    assert len(d) == 0
    d.put("k", 3.0)
    d.save()
    assert json.loads((tmp_path / C.CACHE_FILE).read_text()) == {"k": 3.0}


def test_disabled_cache_neither_reads_nor_writes(tmp_path):
    C.DecisionCache(tmp_path).put("k", 1.0)
    d = C.DecisionCache(tmp_path, enabled=False)
    d.put("k", 1.0)
    d.save()
    assert d.get("k") is None and not (tmp_path / C.CACHE_FILE).exists()


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(C.CACHE_ENV, str(tmp_path / "x"))
    assert C.cache_dir() == tmp_path / "x"
    assert C.DecisionCache().path == tmp_path / "x" / C.CACHE_FILE
    assert os.fspath(C.DecisionCache(tmp_path / "y").path) == os.fspath(tmp_path / "y" / C.CACHE_FILE)
