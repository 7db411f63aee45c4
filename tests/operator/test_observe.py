"""The operator's measurements of agents' scratch directories never follow a link out of them."""

import os

from llmos.agents.operator.observe import dir_usage


def test_dir_usage_counts_files_and_ranks_top_entries(tmp_path):
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "a.bin").write_bytes(b"x" * 5000)
    (tmp_path / "big" / "b.bin").write_bytes(b"x" * 1000)
    (tmp_path / "small.txt").write_bytes(b"x" * 10)
    sample = dir_usage(tmp_path)
    assert (sample.bytes, sample.files) == (6010, 3)
    assert sample.largest[:2] == [("big", 6000), ("small.txt", 10)]


def test_dir_usage_never_measures_through_a_link(tmp_path):
    host = tmp_path / "host"
    host.mkdir()
    (host / "secret.bin").write_bytes(b"x" * 100_000)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "mine.txt").write_bytes(b"x" * 7)
    os.symlink(host, scratch / "d")  # an agent swapped its directory for a link to the host
    sample = dir_usage(scratch)
    assert (sample.bytes, sample.files) == (7, 1)
    link = tmp_path / "scratch-link"
    os.symlink(scratch, link)  # the scratch directory itself replaced by a link
    assert (dir_usage(link).bytes, dir_usage(link).files) == (0, 0)
    assert not (tmp_path / "missing").exists() and dir_usage(tmp_path / "missing").files == 0
    assert not (tmp_path / "missing").exists()  # measuring creates nothing
