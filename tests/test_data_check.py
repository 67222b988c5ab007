"""`vlmtta data check` on synthetic mini trees: found / missing / broken / partial, and its exit code."""
from __future__ import annotations

from test_data_trees import aircraft_tree, coop_tree, imagenet_tree

from vlmtta.cli import main
from vlmtta.data import check_dataset


def test_report_counts_missing_and_unreadable(tmp_path):
    coop_tree(tmp_path, "eurosat", broken=True, missing=True)
    report = check_dataset("eurosat", tmp_path)
    assert report.status == "broken" and report.layout == "coop" and report.expected == 8100
    assert report.found == 7 and len(report.unreadable) == 1 and report.missing_files[0].endswith("missing.jpg")
    assert check_dataset("eurosat", tmp_path, decode=False).unreadable == []
    assert check_dataset("dtd", tmp_path).status == "missing"


def test_cli_exit_codes(tmp_path, capsys):
    coop_tree(tmp_path, "eurosat")
    coop_tree(tmp_path, "dtd", tpt=True)
    aircraft_tree(tmp_path)
    imagenet_tree(tmp_path, "imagenet_v2", [0, 5], coop=True, listing=False)
    ready = "eurosat,dtd,fgvc_aircraft,imagenet_v2"
    assert main(["data", "check", "--root", str(tmp_path), "--datasets", ready]) == 1  # partial: 8 of 8100 images
    assert main(["data", "check", "--root", str(tmp_path), "--datasets", ready, "--allow-partial"]) == 0
    out = capsys.readouterr().out
    assert "eurosat          partial       8 / 8100" in out and "tpt layout" in out
    coop_tree(tmp_path / "bad", "eurosat", missing=True)
    code = main(["data", "check", "--root", str(tmp_path / "bad"), "--datasets", "eurosat,caltech101", "--allow-partial"])
    captured = capsys.readouterr()
    assert code == 1 and "1 missing files" in captured.out and "caltech101       missing" in captured.out
    assert "2 dataset(s) not ready: eurosat, caltech101" in captured.err
    assert main(["data", "check", "--root", str(tmp_path / "nope")]) == 2
