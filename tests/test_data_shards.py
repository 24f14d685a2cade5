"""Shard spec expansion and startup errors."""

import pytest

from data_helpers import student_spec, teacher_spec, write_caption_shards
from taid_vlm.data import build_loader, expand_shards


@pytest.fixture()
def shard_dir(tmp_path):
    write_caption_shards(tmp_path / "a", 3, 2)
    write_caption_shards(tmp_path / "b", 2, 2, prefix="other")
    return tmp_path


def test_brace_folder_glob_list_comma(shard_dir):
    d = shard_dir
    brace = expand_shards(str(d / "a" / "shard-{000000..000002}.tar"))
    assert [p.rsplit("/", 1)[1] for p in brace] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert expand_shards(d / "a") == brace
    assert expand_shards(str(d / "*" / "*.tar")) == sorted(brace + expand_shards(d / "b"))
    assert len(expand_shards([d / "a", str(d / "b" / "other-000001.tar")])) == 4
    assert len(expand_shards(f"{d / 'a'},{d / 'b'}")) == 5
    assert len(expand_shards([d / "a", d / "a" / "shard-000000.tar"])) == 3  # duplicates dropped
    assert expand_shards("pipe:cat x.tar") == ["pipe:cat x.tar"]  # remote: passed to webdataset's gopen


def test_missing_and_empty_are_startup_errors(shard_dir, tmp_path, tiny_tokenizer):
    missing = str(shard_dir / "a" / "shard-{000000..000003}.tar")
    with pytest.raises(FileNotFoundError, match="shard-000003.tar"):
        expand_shards(missing)
    with pytest.raises(FileNotFoundError, match="matches no files"):
        expand_shards(str(tmp_path / "nothing" / "*.tar"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="contains no .tar"):
        expand_shards(tmp_path / "empty")
    for spec in ("", [], " , "):
        with pytest.raises(ValueError, match="empty shard spec"):
            expand_shards(spec)
    with pytest.raises(FileNotFoundError, match="shard-000003.tar"):
        build_loader(missing, student_spec(tiny_tokenizer), teacher_spec(tiny_tokenizer), mode="eval")


def test_build_loader_config_errors(shard_dir, tiny_tokenizer):
    s, t = student_spec(tiny_tokenizer), teacher_spec(tiny_tokenizer)
    with pytest.raises(ValueError, match="text_only"):
        build_loader(shard_dir / "a", s, t, pack=True)
    with pytest.raises(ValueError, match="mode"):
        build_loader(shard_dir / "a", s, t, mode="test")
    from taid_vlm.spec import InputSpec

    with pytest.raises(ValueError, match="text-only"):
        build_loader(shard_dir / "a", InputSpec(tiny_tokenizer), t)
    # A template that never renders assistant turns marks nothing, with or without generation blocks.
    no_gen = "{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] }}{% endif %}{% endfor %}"
    with pytest.raises(ValueError, match="marks no assistant tokens"):
        build_loader(shard_dir / "a", student_spec(tiny_tokenizer, chat_template=no_gen), t)
