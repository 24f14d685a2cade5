"""data_tools.text_corpus: the real-text bed's corpus builder (split by file, determinism, licences, errors)."""

import json
import tarfile
from pathlib import Path

from data_tools.text_corpus import build, chunks
from data_tools.text_corpus import main as corpus_main

FILES = {f"pkg/mod{i}.py": "".join(f"def f{i}_{j}(x):\n    '''Return x plus {j}.'''\n    return x + {j}\n"
                                   for j in range(12)) for i in range(10)}


def _site(tmp_path: Path) -> Path:
    site = tmp_path / "site"
    for rel, text in FILES.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_text(text)
    info = site / "pkg-1.2.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: pkg\nVersion: 1.2\n"
                                   "Classifier: License :: OSI Approved :: MIT License\n")
    (info / "top_level.txt").write_text("pkg\n")
    return site


def _build(tmp_path, site, name, seed=3):
    return build(site, tmp_path / name, ["pkg"], seed=seed, val_fraction=0.3, chunk_chars=120, vocab_size=300)


def _samples(folder: Path) -> dict:
    out = {}
    for p in sorted(folder.glob("*.tar")):
        with tarfile.open(p) as tf:
            for m in tf.getmembers():
                out[m.name] = json.loads(tf.extractfile(m).read())["text"]
    return out


def test_split_is_by_file_and_loses_no_text(tmp_path):
    m = _build(tmp_path, _site(tmp_path), "a")
    split = {f["path"]: f["split"] for f in m["files"]}
    assert set(split) == set(FILES) and set(split.values()) == {"train", "val"}
    for name in ("train", "val"):
        texts = _samples(tmp_path / "a" / name)
        files = {k.rsplit("-", 1)[0].replace("pkg_", "pkg/") + ".py" for k in texts}
        assert {split[f] for f in files} == {name}  # every chunk of a split comes from a file of that split
        for f in files:  # and the chunks of a file, in order, are the whole file
            parts = sorted((int(k.rsplit("-", 1)[1].split(".")[0]), t) for k, t in texts.items()
                           if k.startswith(f[:-3].replace("/", "_") + "-"))
            assert "".join(t for _, t in parts) == FILES[f]
    assert m["totals"]["train"]["files"] + m["totals"]["val"]["files"] == len(FILES)
    assert all(f["licence"] == "MIT License" and f["distribution"] == "pkg" and f["tokens"] > 0 for f in m["files"])


def _without_mtime(path):
    def strip(node):
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k != "mtime_ns"}
        return [strip(v) for v in node] if isinstance(node, list) else node

    return strip(json.loads(path.read_text()))


def test_same_seed_same_bytes_other_seed_other_split(tmp_path):
    site = _site(tmp_path)
    a, _ = _build(tmp_path, site, "a"), _build(tmp_path, site, "b")
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b and any(str(p).startswith("tokenizer") for p in files_a)
    for p in files_a:
        if p.name.endswith(".idx") or p.name == "shards.index.json":  # the shard index records each tar's mtime
            assert _without_mtime(tmp_path / "a" / p) == _without_mtime(tmp_path / "b" / p), p
            continue
        assert (tmp_path / "a" / p).read_bytes() == (tmp_path / "b" / p).read_bytes(), p
    c = _build(tmp_path, site, "c", seed=4)
    assert [f["split"] for f in a["files"]] != [f["split"] for f in c["files"]]


def test_tokenizer_loads_and_supervises_every_text_token(tmp_path):
    from taid_vlm.data.render import IGNORE_INDEX, Renderer
    from taid_vlm.data.samples import Sample
    from taid_vlm.models.tokenizer_loading import load_tokenizer
    from taid_vlm.spec import InputSpec

    _build(tmp_path, _site(tmp_path), "a")
    tok = load_tokenizer({"path": str(tmp_path / "a" / "tokenizer")})
    assert 256 < len(tok) <= 300 and tok.decode(tok("def f(x):\n    return x")["input_ids"]) == "def f(x):\n    return x"
    r = Renderer(InputSpec(tokenizer=tok), max_length=64)(Sample(key="k", text="def f(x):\n    return x + 1\n"))
    assert r.labels[0] == IGNORE_INDEX and r.labels[1:] == r.input_ids[1:] and r.input_ids[-1] == tok.eos_token_id


def test_chunks_keep_whole_lines_and_cut_only_long_ones():
    text = "a = 1\n" * 30 + "x" * 50 + "\n"
    out = list(chunks(text, 20))
    assert "".join(out) == text and all(len(c) <= 20 for c in out)
    assert out[0] == "a = 1\n" * 3


def test_bad_source_is_one_line(tmp_path, capsys):
    assert corpus_main(["--out", str(tmp_path / "o"), "--source", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--source" in err and "nope" in err
    assert corpus_main(["--out", str(tmp_path / "o"), "--source", str(_site(tmp_path)), "--packages", "nopkg"]) == 2
    assert "nopkg" in capsys.readouterr().err


def test_a_folder_of_other_files_is_refused_and_left_as_it_was(tmp_path, capsys):
    out = tmp_path / "mine"
    (out / "train").mkdir(parents=True)
    (out / "train" / "notes.txt").write_text("keep me")
    site = _site(tmp_path)
    for extra in ([], ["--overwrite"]):
        assert corpus_main(["--out", str(out), "--source", str(site), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "not empty" in err and str(out) in err
    assert sorted(p.name for p in out.rglob("*")) == ["notes.txt", "train"]
    assert (out / "train" / "notes.txt").read_text() == "keep me"
