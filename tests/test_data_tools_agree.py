"""make_shards, check_shards and the training loader agree on what a usable sample is; the tools'
output-folder safety; one voice for user errors (taid_vlm.errors)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from data_helpers import caption_sample, conv_sample, jpg, student_spec, teacher_spec, write_tar
from data_tools.check_shards import check
from data_tools.check_shards import main as check_main
from data_tools.make_shards import main as make_main
from taid_vlm.data import build_loader
from taid_vlm.errors import UserError, run_cli

ROOT = Path(__file__).resolve().parents[1]


def _last_json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _jsonl(tmp_path, lines):
    src = tmp_path / "d.jsonl"
    src.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return src


def _images(tmp_path):
    root = tmp_path / "img"
    root.mkdir(exist_ok=True)
    good = jpg(size=64)
    (root / "good.jpg").write_bytes(good)
    (root / "cut.jpg").write_bytes(good[: len(good) * 2 // 3])  # truncated: header fine, data cut
    return root


def test_make_shards_validates_like_the_loader(tmp_path, capsys, tiny_tokenizer):
    """A truncated JPEG and an empty answer are skipped by reason; everything written is accepted by
    check_shards and by the loader."""
    root = _images(tmp_path)
    conv = lambda answer: [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": answer}]  # noqa: E731
    src = _jsonl(tmp_path, [
        {"id": "ok1", "image": "good.jpg", "caption": "a red square"},
        {"id": "ok2", "image": "good.jpg", "conversations": conv("red")},
        {"id": "cut", "image": "cut.jpg", "caption": "a red square"},
        {"id": "empty_answer", "image": "good.jpg", "conversations": conv("  ")},
        {"id": "empty_caption", "image": "good.jpg", "caption": ""},
        {"id": "no_image_file", "image": "nope.jpg", "caption": "x"},
    ])
    assert make_main(["--jsonl", str(src), "--image-root", str(root), "--out", str(tmp_path / "o"), "--json"]) == 0
    rep = _last_json(capsys)
    assert rep["inputs"] == 6 and rep["written"] == 2
    assert rep["skipped_by_reason"] == {"corrupt_image": 1, "missing_image": 1, "missing_text": 2}
    assert rep["skipped_examples"]["corrupt_image"] == ["cut"]
    assert sorted(rep["skipped_examples"]["missing_text"]) == ["empty_answer", "empty_caption"]
    checked = check(str(tmp_path / "o"))
    assert checked["samples"] == 2 and checked["bad"] == 0
    loader = build_loader(tmp_path / "o", student_spec(tiny_tokenizer), teacher_spec(tiny_tokenizer), mode="eval",
                          batch_size=4, max_length=256, num_workers=0)
    assert sorted(k for b in loader for k in b["keys"]) == ["ok1", "ok2"] and loader.skips.total == 0


def test_out_folder_refused_unless_overwrite_and_only_own_shards_replaced(tmp_path, capsys):
    root = _images(tmp_path)
    out = tmp_path / "o"
    many = _jsonl(tmp_path, [{"id": f"k{i}", "image": "good.jpg", "caption": f"c{i}"} for i in range(5)])
    assert make_main(["--jsonl", str(many), "--image-root", str(root), "--out", str(out), "--maxcount", "2"]) == 0
    shards = ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    index = [f"{s}.idx" for s in shards] + ["shards.index.json"]  # the shard index is written with the shards
    assert sorted(p.name for p in out.iterdir()) == sorted(shards + index)
    (out / "notes.txt").write_text("mine")
    (out / "other-000000.tar").write_bytes(b"not ours")
    capsys.readouterr()

    # refused: one line naming the folder, nothing changed
    assert make_main(["--jsonl", str(many), "--image-root", str(root), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: output folder is not empty") and f"--out {out}" in err and "\n" not in err
    assert len(list(out.iterdir())) == 9

    # a run with no usable sample replaces nothing, even with --overwrite
    bad = _jsonl(tmp_path, [{"id": "x", "image": "cut.jpg", "caption": "c"}])
    assert make_main(["--jsonl", str(bad), "--image-root", str(root), "--out", str(out), "--overwrite"]) == 2
    assert "no usable sample" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == sorted(["notes.txt", "other-000000.tar"] + shards + index)

    # --overwrite: the three old shards go, one new shard comes; other files stay untouched
    one = _jsonl(tmp_path, [{"id": "new", "image": "good.jpg", "caption": "fresh"}])
    assert make_main(["--jsonl", str(one), "--image-root", str(root), "--out", str(out), "--overwrite", "--json"]) == 0
    rep = _last_json(capsys)
    assert rep["replaced"] == 3 and rep["kept_other_files"] == ["notes.txt", "other-000000.tar"]
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "other-000000.tar", "shard-000000.tar",
                                                     "shard-000000.tar.idx", "shards.index.json"]
    assert (out / "notes.txt").read_text() == "mine" and (out / "other-000000.tar").read_bytes() == b"not ours"
    assert check(str(out / "shard-000000.tar"))["samples"] == 1


def test_user_errors_are_one_line_with_status_2_and_traceback_only_with_debug(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=900)

    missing = tmp_path / "missing.jsonl"
    r = run("data_tools.make_shards", "--jsonl", str(missing), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and r.stderr.strip() == f"error: no such file (--jsonl {missing})"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    r = run("data_tools.make_shards", "--text-jsonl", str(empty), "--out", str(tmp_path / "o2"))
    assert r.returncode == 2 and r.stderr.strip().startswith("error: no usable sample: no input found")
    assert not (tmp_path / "o2").exists() or not any((tmp_path / "o2").iterdir())
    r = run("data_tools.check_shards", str(tmp_path / "nope-{0..1}.tar"), "--debug")
    assert r.returncode == 2 and "Traceback" in r.stderr and "nope-0.tar" in r.stderr.splitlines()[-1]
    r = run("data_tools.check_shards", str(tmp_path / "nope.tar"), "--max-length", "1")
    assert r.returncode == 2 and r.stderr.strip() == "error: must be >= 2, got 1 (--max-length)"
    r = run("data_tools.check_shards", "--config", str(tmp_path / "no.yaml"))
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr


def test_run_cli_contract(capsys):
    def fails(argv):
        raise UserError("bad thing", "--flag x")

    assert run_cli(fails, []) == 2
    assert capsys.readouterr().err == "error: bad thing (--flag x)\n"
    assert run_cli(fails, ["--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.endswith("error: bad thing (--flag x)\n")
    assert run_cli(lambda argv: open("/nonexistent/x"), []) == 2
    assert capsys.readouterr().err == "error: No such file or directory (/nonexistent/x)\n"
    seen = []
    assert run_cli(lambda argv: seen.append(argv), ["a", "--debug", "b"]) == 0 and seen == [["a", "b"]]
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        run_cli(lambda argv: 1 / 0, [])


def test_check_shards_strict_fails_on_zero_good_samples(tmp_path, capsys):
    write_tar(tmp_path / "bad" / "a.tar", [{"__key__": "b", "jpg": jpg()[:40], "txt": b"x"}])
    assert check_main([str(tmp_path / "bad"), "--strict"]) == 1
    write_tar(tmp_path / "empty" / "a.tar", [])
    assert check_main([str(tmp_path / "empty"), "--json"]) == 0
    assert _last_json(capsys)["samples"] == 0
    assert check_main([str(tmp_path / "empty"), "--strict"]) == 1
    write_tar(tmp_path / "good" / "a.tar", [caption_sample("g", "a red circle")])
    assert check_main([str(tmp_path / "good"), "--strict"]) == 0


@pytest.mark.parametrize("max_length", [30, 48, 512])
def test_check_shards_counts_drops_and_cuts_as_the_loader_does(tmp_path, tiny_tokenizer, max_length):
    """At several max_length values: usable, dropped (too_long) and truncated samples equal the loader's."""
    samples = [caption_sample(f"c{i}", "a red circle " * (i % 4 + 1)) for i in range(8)]
    samples += [conv_sample(f"m{i}", n_images=i % 3 + 1, answer="blue " * (i + 1)) for i in range(6)]
    write_tar(tmp_path / "s" / "a.tar", samples)
    specs = [("student", student_spec(tiny_tokenizer)), ("teacher", teacher_spec(tiny_tokenizer))]
    rep = check(str(tmp_path / "s"), max_length=max_length, specs=specs)
    loader = build_loader(tmp_path / "s", specs[0][1], specs[1][1], mode="eval", batch_size=4,
                          max_length=max_length, num_workers=0)
    kept = sum(len(b["keys"]) for b in loader)
    assert rep["usable"] == kept == loader.stats.get("samples", 0)
    assert rep["would_drop"] == loader.skips.total
    assert rep["dropped_by_reason"] == loader.skips.as_dict()
    assert rep["would_truncate"] == loader.stats.get("truncated", 0)
    assert rep["samples"] == 14 and rep["usable"] + rep["would_drop"] == 14
    if max_length == 30:  # the teacher's 16 tokens per image leave no answer inside 30 tokens
        assert rep["usable"] == 0 and rep["models"]["teacher"]["too_long"] == 14
    if max_length == 48:  # some dropped, some kept but cut
        assert rep["would_drop"] == 4 and rep["would_truncate"] == 7
    if max_length == 512:
        assert rep["would_drop"] == rep["would_truncate"] == 0


def test_check_shards_reads_img2dataset_stats(tmp_path, capsys):
    samples = [{"__key__": f"{i:09d}", "jpg": jpg(), "txt": f"photo {i}".encode()} for i in range(3)]
    write_tar(tmp_path / "00000.tar", samples)
    (tmp_path / "00000_stats.json").write_text(json.dumps({
        "count": 5, "successes": 3, "failed_to_download": 1, "failed_to_resize": 1, "duration": 1.0,
        "status_dict": {"success": 3, "<urlopen error [Errno 111] Connection refused>": 1, "image decoding error": 1}}))
    assert check_main([str(tmp_path / "{00000..00000}.tar")]) == 0
    text = capsys.readouterr().out
    assert "img2dataset (1 stats files): 5 urls, 3 successes, 1 failed to download, 1 failed to resize" in text
    assert check_main([str(tmp_path / "00000.tar"), "--json"]) == 0
    rep = _last_json(capsys)
    assert rep["img2dataset"]["count"] == 5 and rep["img2dataset"]["status"]["success"] == 3
    assert rep["samples"] == 3


def test_check_shards_from_a_training_config_matches_the_loader_of_its_models(tmp_path, capsys):
    """--config: the specs built on the meta device give the counts the loader gives with the real models."""
    from data_tools.synth_shapes import synth
    from taid_vlm.config import load_config
    from taid_vlm.models import build_model

    synth(tmp_path / "shapes", n=24, seed=1, size=32, val_fraction=0.0)
    shards = str(tmp_path / "shapes" / "train")
    assert check_main(["--config", str(ROOT / "configs/tiny_vlm.yaml"), shards, "--max-length", "64", "--json"]) == 0
    rep = _last_json(capsys)
    cfg = load_config(ROOT / "configs/tiny_vlm.yaml")
    student = build_model(cfg.student.model, role="student", where="student.model")
    teacher = build_model(cfg.teacher.model, role="teacher", where="teacher.model")
    loader = build_loader(shards, student.input_spec, teacher.input_spec, mode="eval", batch_size=4, max_length=64,
                          num_workers=0)
    kept = sum(len(b["keys"]) for b in loader)
    assert rep["max_length"] == 64 and set(rep["models"]) == {"student", "teacher"}
    assert rep["usable"] == kept == loader.stats.get("samples", 0) and rep["would_drop"] == loader.skips.total
    assert rep["would_truncate"] == loader.stats.get("truncated", 0)
    assert rep["samples"] == 24 and 0 < kept < 24
