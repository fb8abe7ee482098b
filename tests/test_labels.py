"""Label files: round trips, validation errors (file:line), nlogn generation, PIPAL MOS, TID2013 prep, CLI."""

import math
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from afine.errors import AfineError
from afine.labels import (
    MOSRecord,
    Triplet,
    lowercase_tid2013,
    main,
    nlogn_triplets,
    normalise_pipal_mos,
    read_mos,
    read_mos_folder,
    read_sriqa_mos,
    read_triplets,
    write_mos,
    write_triplets,
)
from tests import procs

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- round trips


def test_mos_three_columns_round_trip(tmp_path):
    records = [MOSRecord("A0002_00_00.bmp", "A0002.bmp", 1466.4372), MOSRecord("A0002_00_01.bmp", "A0002.bmp", -3.0)]
    write_mos(tmp_path / "m.txt", records)
    assert (tmp_path / "m.txt").read_text() == "A0002_00_00.bmp,A0002.bmp,1466.4372\nA0002_00_01.bmp,A0002.bmp,-3\n"
    assert read_mos(tmp_path / "m.txt") == records


def test_mos_four_columns_round_trip(tmp_path):
    records = [MOSRecord("I01_01_02.png", "I01.png", 4.33, 0.869), MOSRecord("I01_01_03.png", "I01.png", 1 / 3, 0.1)]
    write_mos(tmp_path / "m.txt", records)
    assert (tmp_path / "m.txt").read_text().splitlines()[0] == "I01_01_02.png,I01.png,4.33,0.869"
    assert read_mos(tmp_path / "m.txt") == records  # 1/3 survives exactly


def test_read_mos_strips_whitespace_and_skips_blank_lines(tmp_path):
    (tmp_path / "m.txt").write_text("\n a.png , r.png , 2.5 \n\n b.png,r.png,1,0.2\r\n")
    assert read_mos(tmp_path / "m.txt") == [MOSRecord("a.png", "r.png", 2.5), MOSRecord("b.png", "r.png", 1.0, 0.2)]


def test_read_mos_folder_sorted_concatenation(tmp_path):
    write_mos(tmp_path / "b.txt", [MOSRecord("b1", "b", 1.0)])
    write_mos(tmp_path / "a.txt", [MOSRecord("a1", "a", 2.0), MOSRecord("a2", "a", 3.0)])
    (tmp_path / "notes.md").write_text("ignored")
    assert [r.dis for r in read_mos_folder(tmp_path)] == ["a1", "a2", "b1"]


def test_triplets_six_and_four_columns_round_trip(tmp_path):
    six = [Triplet("a.png", "b.png", "r.png", 1.0, 0.0, 0.0), Triplet("b.png", "r.png", "r.png", 0.0, 0.0, 0.5)]
    four = [Triplet("x_01.png", "x_02.png", "x.png", 0.5), Triplet("x_02.png", "x_01.png", "x.png", 0.0)]
    write_triplets(tmp_path / "six.txt", six)
    write_triplets(tmp_path / "four.txt", four)
    assert (tmp_path / "six.txt").read_text().splitlines()[0] == "a.png,b.png,r.png,1,0,0"
    assert (tmp_path / "four.txt").read_text().splitlines()[0] == "x_01.png,x_02.png,x.png,0.5"
    assert read_triplets(tmp_path / "six.txt") == six
    assert read_triplets(tmp_path / "four.txt") == four


def test_triplet_labels_accept_float_spellings(tmp_path):
    (tmp_path / "t.txt").write_text("a,b,r,1.0,0.50,0.0\n")
    assert read_triplets(tmp_path / "t.txt") == [Triplet("a", "b", "r", 1.0, 0.5, 0.0)]


@pytest.mark.parametrize("text", ["s_Original.png,100\ns_BSRGANx4.png,42.5\n",
                                  "s_Original.png 100\ns_BSRGANx4.png\t42.5\n"])
def test_sriqa_mos_comma_and_space(tmp_path, text):
    (tmp_path / "s.txt").write_text(text)
    assert read_sriqa_mos(tmp_path / "s.txt") == [("s_Original.png", 100.0), ("s_BSRGANx4.png", 42.5)]


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("reader, text, line, words", [
    (read_mos, "a,r,1\na,r\n", 2, "3 or 4 columns"),
    (read_mos, "a,r,1\n\na,r,1,2,3\n", 3, "3 or 4 columns"),
    (read_mos, "a,r,good\n", 1, "not a number"),
    (read_mos, "a,r,1\nb,r,2,high\n", 2, "not a number"),
    (read_mos, "a,r,nan\n", 1, "not finite"),
    (read_mos, ",r,1\n", 1, "empty distorted"),
    (read_triplets, "a,b,r,1,0,0\na,b,r,1,0\n", 2, "6 columns"),
    (read_triplets, "a,b,r,2,0,0\n", 1, "not a label"),
    (read_triplets, "a,b,r,1,0,0\na,b,r,0.3\n", 2, "not a label"),
    (read_triplets, "a,b,r,one\n", 1, "not a number"),
    (read_sriqa_mos, "a,1\nb 2 3\n", 2, "name,score"),
    (read_sriqa_mos, "a,1\nb,x\n", 2, "not a number"),
])
def test_bad_lines_name_file_and_line(tmp_path, reader, text, line, words):
    path = tmp_path / "bad.txt"
    path.write_text(text)
    with pytest.raises(AfineError, match=words) as e:
        reader(path)
    assert str(e.value).startswith(f"{path}:{line}: ")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("reader", [read_mos, read_triplets, read_sriqa_mos])
def test_empty_and_missing_files(tmp_path, reader):
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(AfineError, match=r"empty.txt:1: empty file"):
        reader(tmp_path / "empty.txt")
    with pytest.raises(AfineError, match=r"nope.txt: file not found"):
        reader(tmp_path / "nope.txt")


def test_mos_folder_missing_or_without_lists(tmp_path):
    with pytest.raises(AfineError, match="MOS folder not found"):
        read_mos_folder(tmp_path / "MOS")
    (tmp_path / "MOS").mkdir()
    with pytest.raises(AfineError, match="no \\*.txt MOS files"):
        read_mos_folder(tmp_path / "MOS")
    (tmp_path / "MOS" / "b.txt").write_text("x,r,1\ny,r\n")
    with pytest.raises(AfineError, match=r"b.txt:2: "):
        read_mos_folder(tmp_path / "MOS")


def test_write_triplets_rejects_bad_labels(tmp_path):
    with pytest.raises(AfineError, match="not 0, 0.5 or 1"):
        write_triplets(tmp_path / "t.txt", [Triplet("a", "b", "r", 0.7)])
    with pytest.raises(AfineError, match="only one of g1y, g2y"):
        write_triplets(tmp_path / "t.txt", [Triplet("a", "b", "r", 1.0, 0.0)])


# ---------------------------------------------------------------------------------------------- nlogn


def _group(ref, n_dis, mos):
    return [MOSRecord(f"{ref}_{i:03d}.png", f"{ref}.png", mos(i)) for i in range(n_dis)]


@pytest.mark.parametrize("n_dis", [4, 6, 7, 10, 31, 125])
def test_nlogn_counts_and_no_repeated_pair(n_dis):
    records = _group("A", n_dis, lambda i: float(i % 5))
    triplets = nlogn_triplets(records, seed=3)
    n = n_dis + 1  # the reference joins its group
    k = round(math.log2(n))
    assert len(triplets) == n * k
    names = {r.dis for r in records} | {"A.png"}
    as_first = Counter(t.x1 for t in triplets)
    as_second = Counter(t.x2 for t in triplets)
    assert set(as_first) == names and set(as_first.values()) == {k}
    assert set(as_second) == names and set(as_second.values()) == {k}
    assert all(t.x1 != t.x2 and t.y == "A.png" for t in triplets)
    unordered = {frozenset((t.x1, t.x2)) for t in triplets}
    assert len(unordered) == len(triplets)  # no pair twice, in either order (k <= (n-1)/2 here)


def test_nlogn_small_groups_still_distinct_partners():
    for n_dis in range(6):
        triplets = nlogn_triplets(_group("A", n_dis, float), seed=0)
        n = n_dis + 1
        k = min(round(math.log2(n)), n - 1)
        assert len(triplets) == n * k
        assert len({(t.x1, t.x2) for t in triplets}) == len(triplets)


def test_nlogn_labels_follow_mos_and_reference_rules():
    mos = {0: 3.0, 1: 1.0, 2: 3.0, 3: 2.0, 4: 5.0, 5: 0.5, 6: 4.0}
    records = _group("R", 7, mos.get) + _group("S", 9, lambda i: 10.0 - i)
    value = {r.dis: r.mos for r in records} | {"R.png": math.inf, "S.png": math.inf}
    triplets = nlogn_triplets(records, seed=1)
    assert {t.y for t in triplets} == {"R.png", "S.png"}
    refs_seen = 0
    for t in triplets:
        a, b = value[t.x1], value[t.x2]
        assert t.g12 == (1.0 if a > b else 0.0 if a < b else 0.5)
        assert t.g1y == (0.5 if t.x1 == t.y else 0.0)
        assert t.g2y == (0.5 if t.x2 == t.y else 0.0)
        assert t.x1.startswith(t.y[0]) and t.x2.startswith(t.y[0])  # pairs stay inside their group
        refs_seen += t.x1 == t.y or t.x2 == t.y
    assert refs_seen > 0


def test_nlogn_deterministic_seeded_and_order_independent():
    records = _group("A", 20, float) + _group("B", 20, lambda i: -float(i))
    first = nlogn_triplets(records, seed=5)
    assert nlogn_triplets(list(reversed(records)), seed=5) == first
    assert nlogn_triplets(records, seed=6) != first


def test_nlogn_rejects_duplicates_and_self_reference():
    with pytest.raises(AfineError, match="appears twice"):
        nlogn_triplets([MOSRecord("a", "r", 1.0), MOSRecord("a", "r", 2.0)], seed=0)
    with pytest.raises(AfineError, match="names itself"):
        nlogn_triplets([MOSRecord("r", "r", 1.0)], seed=0)


# ---------------------------------------------------------------------------------------------- PIPAL MOS


def test_normalise_pipal_mos_hand_values():
    y = normalise_pipal_mos(np.array([1000.0, 1500.0, 1250.0, 1125.0]))
    np.testing.assert_allclose(y, [2.0, -2.0, 0.0, 1.0])  # best -> -2, worst -> 2


def test_normalise_pipal_mos_rejects_constant_and_empty():
    with pytest.raises(AfineError, match="equal"):
        normalise_pipal_mos(np.array([3.0, 3.0]))
    with pytest.raises(AfineError, match="no MOS"):
        normalise_pipal_mos(np.array([]))


# ---------------------------------------------------------------------------------------------- TID2013


def test_lowercase_tid2013(tmp_path):
    root = tmp_path / "TID2013"
    (root / "images").mkdir(parents=True)
    for name in ("I01.BMP", "I01_01_1.bmp", "i02.bmp"):
        (root / "images" / name).write_bytes(name.encode())
    (root / "Train" / "MOS").mkdir(parents=True)
    (root / "Train" / "Triplet").mkdir(parents=True)
    (root / "Train" / "MOS" / "I01.txt").write_text("I01_01_1.bmp,I01.BMP,5.1E0\n")
    (root / "Train" / "Triplet" / "Triplet.txt").write_text("I01_01_1.bmp,I01.BMP,I01.BMP,0,0,0.5\n")
    counts = lowercase_tid2013(root)
    assert sorted(p.name for p in (root / "images").iterdir()) == ["i01.bmp", "i01_01_1.bmp", "i02.bmp"]
    assert (root / "images" / "i01.bmp").read_bytes() == b"I01.BMP"
    assert read_mos(root / "Train" / "MOS" / "i01.txt") == [MOSRecord("i01_01_1.bmp", "i01.bmp", 5.1)]
    assert read_triplets(root / "Train" / "Triplet" / "Triplet.txt")[0].x1 == "i01_01_1.bmp"
    assert counts == {"images_renamed": 2, "label_files_renamed": 1, "label_files_rewritten": 2}
    assert lowercase_tid2013(root) == {"images_renamed": 0, "label_files_renamed": 0, "label_files_rewritten": 0}


def test_lowercase_tid2013_refuses_clash(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "A.bmp").write_bytes(b"1")
    (tmp_path / "images" / "a.bmp").write_bytes(b"2")
    if len(list((tmp_path / "images").iterdir())) < 2:
        pytest.skip("case-insensitive file system")
    with pytest.raises(AfineError, match="already exists"):
        lowercase_tid2013(tmp_path)


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_nlogn_and_pipal_mos(tmp_path, capsys):
    mos_dir = tmp_path / "MOS"
    write_mos(mos_dir / "A.txt", _group("A", 7, float))
    write_mos(mos_dir / "B.txt", _group("B", 7, lambda i: 10.0 * i))
    assert main(["nlogn", "--mos-dir", str(mos_dir), "--out", str(tmp_path / "T.txt"), "--seed", "2"]) == 0
    expected = nlogn_triplets(read_mos_folder(mos_dir), seed=2)
    assert read_triplets(tmp_path / "T.txt") == expected
    assert f"wrote {len(expected)} triplets" in capsys.readouterr().out
    assert main(["pipal-mos", "--mos-dir", str(mos_dir), "--out", str(tmp_path / "p.txt")]) == 0
    normalised = read_mos(tmp_path / "p.txt")
    assert normalised[0] == MOSRecord("A_000.png", "A.png", 2.0) and normalised[-1].mos == -2.0
    capsys.readouterr()
    assert main(["pipal-mos", "--mos-dir", str(mos_dir)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "A_000.png,A.png,2"


def test_cli_out_dash_is_the_list_alone_on_stdout_and_another_suffix_is_refused(tmp_path, capsys, monkeypatch):
    mos_dir = tmp_path / "MOS"
    write_mos(mos_dir / "A.txt", _group("A", 7, float))
    monkeypatch.chdir(tmp_path)
    for command, reader in (("nlogn", read_triplets), ("pipal-mos", read_mos)):
        assert main([command, "--mos-dir", str(mos_dir), "--out", str(tmp_path / "list.txt")]) == 0
        summary = capsys.readouterr().out
        assert main([command, "--mos-dir", str(mos_dir), "--out", "-"]) == 0
        captured = capsys.readouterr()
        (tmp_path / "stdout.txt").write_text(captured.out)
        assert reader(tmp_path / "stdout.txt") == reader(tmp_path / "list.txt")
        assert captured.err.startswith(summary.split(" to ")[0]) and captured.err.endswith(" to -\n")
        assert main([command, "--mos-dir", str(mos_dir), "--out", str(tmp_path / "list.csv")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {tmp_path / 'list.csv'}: cannot write, the file name must end in .txt")
    assert not (tmp_path / "-").exists() and not (tmp_path / "list.csv").exists()


def test_cli_error_is_one_line_exit_2(tmp_path):
    (tmp_path / "MOS").mkdir()
    (tmp_path / "MOS" / "a.txt").write_text("x,r,1\ny,r,oops\n")
    proc = procs.run([sys.executable, "-m", "afine.labels", "nlogn", "--mos-dir", tmp_path / "MOS", "--out",
                      tmp_path / "t.txt"], cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ")
    assert f"{tmp_path / 'MOS' / 'a.txt'}:2: " in proc.stderr
    assert not (tmp_path / "t.txt").exists()


def test_cli_lowercase_missing_root(tmp_path, capsys):
    assert main(["lowercase-tid2013", str(tmp_path / "TID2013")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: ") and captured.err.count("\n") == 1


def test_cli_unwritable_out_fails_before_reading(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "T.txt"
    for argv in (["nlogn", "--out", str(out)], ["pipal-mos", "--out", str(out)]):
        assert main([*argv, "--mos-dir", str(tmp_path / "missing")]) == 2  # the output is checked first
        captured = capsys.readouterr()
        assert captured.err.startswith(f"error: {out}: cannot write") and captured.err.count("\n") == 1


@pytest.mark.parametrize("reader, text, first", [
    (read_mos, "a.png,r.png,2.5\nb.png,r.png,1\n", MOSRecord("a.png", "r.png", 2.5)),
    (read_triplets, "a.png,b.png,r.png,1,0,0\n", Triplet("a.png", "b.png", "r.png", 1.0, 0.0, 0.0)),
    (read_sriqa_mos, "s_Mx4.png 40\n", ("s_Mx4.png", 40.0)),
])
def test_byte_order_mark_does_not_touch_the_first_line(tmp_path, reader, text, first):
    path = tmp_path / "labels.txt"
    path.write_bytes("\ufeff".encode() + text.encode())  # as Windows editors save UTF-8
    assert reader(path)[0] == first


@pytest.mark.parametrize("reader, lines", [
    (read_mos, ["a.png,r.png,2.5", "b.png,r.png,1", "a.png, r.png, 2.50"]),
    (read_triplets, ["a,b,r,1,0,0", "b,a,r,0,0,0", "a,b,r,1.0,0,0"]),
    (read_sriqa_mos, ["x.png,40", "y.png 30", "x.png 40"]),
])
def test_repeated_entry_warns_once_naming_both_lines(tmp_path, capsys, reader, lines):
    path = tmp_path / "labels.txt"
    path.write_text("\n".join(lines + ["", lines[0]]) + "\n")  # lines 1, 3 and 5 hold the same entry
    assert len(reader(path)) == 4  # kept as they are: only a warning
    reader(path)
    err = capsys.readouterr().err
    assert err == f"warning: {path}: lines 1 and 3 hold the same entry (1 more repeat)\n"
    unique = tmp_path / "unique.txt"
    unique.write_text("\n".join(lines[:2]) + "\n")
    reader(unique)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("command", ["nlogn", "pipal-mos"])
def test_cli_out_over_a_mos_list_it_reads_is_refused(tmp_path, capsys, command):
    mos_dir = tmp_path / "MOS"
    write_mos(mos_dir / "A.txt", _group("A", 7, float))
    write_mos(mos_dir / "B.txt", _group("B", 7, float))
    before = (mos_dir / "B.txt").read_bytes()
    (tmp_path / "alias").symlink_to(mos_dir)
    for out in (mos_dir / "B.txt", tmp_path / "alias" / "B.txt"):
        assert main([command, "--mos-dir", str(mos_dir), "--out", str(out)]) == 2
        captured = capsys.readouterr()
        assert captured.err.startswith(f"error: {out}: cannot write, this command reads that file")
        assert captured.err.count("\n") == 1 and captured.out == ""
    assert (mos_dir / "B.txt").read_bytes() == before

