"""Each source format round-trips: make_shards (or img2dataset's own layout) -> pipeline -> batches."""

import json

import torch

from data_helpers import jpg, png, student_spec, teacher_spec, text_spec, write_tar
from data_tools.make_shards import main as make_shards
from taid_vlm.data import IGNORE_INDEX, build_loader


def _supervised_texts(batch, tok, who="student"):
    out = []
    for row in batch[who]["labels"]:
        out.append(tok.decode([t for t in row.tolist() if t != IGNORE_INDEX]))
    return out


def _read(shards, tok, **kw):
    loader = build_loader(shards, student_spec(tok), teacher_spec(tok), mode="eval", batch_size=4,
                          max_length=512, num_workers=0, **kw)
    batches = list(loader)
    for b in batches:
        assert torch.equal(b["student"]["loss_targets"], b["teacher"]["loss_targets"])
    return loader, batches


def _report(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_image_folder_with_captions(tmp_path, tiny_tokenizer, capsys):
    src = tmp_path / "imgs"
    (src / "sub").mkdir(parents=True)
    for i in range(5):
        (src / f"im.{i}.jpg").write_bytes(jpg((i * 40, 0, 0)))  # a dot in the stem: keys must stay whole
        (src / f"im.{i}.txt").write_text(f"a red circle number {i}")
    (src / "sub" / "p.png").write_bytes(png())
    (src / "sub" / "p.txt").write_text("a blue square")
    (src / "nocap.jpg").write_bytes(jpg())
    (src / "broken.jpg").write_bytes(b"garbage")
    (src / "broken.txt").write_text("x")
    assert make_shards(["--image-folder", str(src), "--out", str(tmp_path / "out"), "--maxcount", "4", "--json"]) == 0
    rep = _report(capsys)
    assert rep["written"] == 6 and rep["skipped_by_reason"] == {"corrupt_image": 1, "missing_text": 1}
    assert len(rep["shards"]) == 2
    loader, batches = _read(tmp_path / "out", tiny_tokenizer, caption_instruction="Caption:")
    keys = [k for b in batches for k in b["keys"]]
    texts = [t for b in batches for t in _supervised_texts(b, tiny_tokenizer)]
    assert sorted(keys) == sorted([f"im_{i}" for i in range(5)] + ["sub_p"])
    assert sorted(texts) == sorted([f"a red circle number {i}<|im_end|>" for i in range(5)] + ["a blue square<|im_end|>"])
    assert loader.skips.total == 0


def test_jsonl_captions_conversations_openai_multi_image(tmp_path, tiny_tokenizer, capsys):
    root = tmp_path / "img"
    root.mkdir()
    for n in ("a.jpg", "b.png", "c.webp"):
        (root / n).write_bytes(jpg() if n.endswith("jpg") else png())
    from PIL import Image

    Image.new("RGB", (10, 10)).save(root / "c.webp")
    lines = [
        {"id": "cap", "image": "a.jpg", "caption": "a red thing"},
        {"id": "llava", "image": "b.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat?"}, {"from": "gpt", "value": "blue"}]},
        {"id": "multi", "images": ["a.jpg", "b.png", "c.webp"], "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "same?"},
                                         {"type": "image"}]},
            {"role": "assistant", "content": "no"}]},
        {"id": "missing", "image": "nope.jpg", "caption": "x"},
        {"id": "mismatch", "image": "a.jpg", "conversations": [
            {"from": "human", "value": "what?"}, {"from": "gpt", "value": "red"}]},
    ]
    src = tmp_path / "d.jsonl"
    src.write_text("\n".join(json.dumps(x) for x in lines) + "\n{broken\n")
    assert make_shards(["--jsonl", str(src), "--image-root", str(root), "--out", str(tmp_path / "o"), "--json"]) == 0
    rep = _report(capsys)
    assert rep["written"] == 3
    assert rep["skipped_by_reason"] == {"bad_json": 1, "marker_mismatch": 1, "missing_image": 1}
    loader, batches = _read(tmp_path / "o", tiny_tokenizer)
    (b,) = batches
    assert b["keys"] == ["cap", "llava", "multi"]
    assert _supervised_texts(b, tiny_tokenizer) == ["a red thing<|im_end|>", "blue<|im_end|>", "no<|im_end|>"]
    assert b["student"]["pixel_values"].shape == (5, 3, 24, 24)
    assert int((b["student"]["input_ids"][2] == 3).sum()) == 3 * 4
    assert int((b["teacher"]["input_ids"][2] == 3).sum()) == 3 * 16


def test_llava_json_and_image_root(tmp_path, tiny_tokenizer, capsys):
    root = tmp_path / "coco"
    root.mkdir()
    (root / "1.jpg").write_bytes(jpg())
    data = [{"id": "000001", "image": "1.jpg", "conversations": [
                {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "a red circle"},
                {"from": "human", "value": "Count?"}, {"from": "gpt", "value": "one"}]},
            {"id": "textonly", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yes"}]}]
    (tmp_path / "llava.json").write_text(json.dumps(data))
    assert make_shards(["--llava-json", str(tmp_path / "llava.json"), "--image-root", str(root),
                        "--out", str(tmp_path / "o"), "--json"]) == 0
    assert _report(capsys)["written"] == 2
    _, (b,) = _read(tmp_path / "o", tiny_tokenizer)
    assert b["keys"] == ["000001", "textonly"]
    assert _supervised_texts(b, tiny_tokenizer) == ["a red circle<|im_end|>one<|im_end|>", "yes<|im_end|>"]
    assert b["student"]["pixel_values"].shape[0] == 1  # the text-only conversation has no image


def test_text_jsonl(tmp_path, tiny_tokenizer, capsys):
    lines = [{"text": "red circle"}, {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
             {"caption": "not text"}]
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    assert make_shards(["--text-jsonl", str(tmp_path / "t.jsonl"), "--out", str(tmp_path / "o"), "--json"]) == 0
    assert _report(capsys)["skipped_by_reason"] == {"missing_text": 1}
    tok = tiny_tokenizer
    loader = build_loader(tmp_path / "o", text_spec(tok), text_spec(tok), mode="eval", text_only=True,
                          batch_size=4, max_length=64, num_workers=0)
    (b,) = list(loader)
    # a raw document: every token but the first (nothing predicts it) is supervised, eos appended
    first_dropped = tok.decode(tok.encode("red circle")[1:]) + "<|im_end|>"
    assert _supervised_texts(b, tok) == [first_dropped, "a<|im_end|>"]
    assert b["student"]["pixel_values"] is None


def test_img2dataset_output_reads_unchanged(tmp_path, tiny_tokenizer):
    samples = [{"__key__": f"{i:09d}", "jpg": jpg(), "txt": f"photo {i}".encode(),
                "json": json.dumps({"url": f"http://x/{i}.jpg", "key": f"{i:09d}", "status": "success",
                                    "caption": f"photo {i}", "width": 16, "height": 16}).encode()}
               for i in range(3)]
    write_tar(tmp_path / "00000.tar", samples)
    _, (b,) = _read(str(tmp_path / "{00000..00000}.tar"), tiny_tokenizer)
    assert b["keys"] == ["000000000", "000000001", "000000002"]
    assert _supervised_texts(b, tiny_tokenizer) == [f"photo {i}<|im_end|>" for i in range(3)]
