"""Config rules: one rule for relative paths, overrides that reach into model files, a loss override over
a file written for another loss, unknown Hugging Face config keys."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from taid_vlm.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
TINY_TEXT = REPO / "configs" / "tiny_text.yaml"


def test_file_paths_resolve_against_their_file_and_command_line_paths_against_the_working_directory(tmp_path,
                                                                                                     monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cache" / "t").mkdir(parents=True)
    (tmp_path / "cache" / "t" / "manifest.json").write_text("{}")
    (tmp_path / "ds.json").write_text("{}")
    cfg = load_config(TINY_TEXT)
    assert cfg.resolve_path(cfg.data.train) == str(REPO / "data" / "shapes_text" / "train")  # ../data from configs/
    assert cfg.resolve_path(cfg.output_dir) == str(REPO / "runs" / "tiny_text")
    cfg = load_config(TINY_TEXT, ["data.train=shards/train", "data.val=a/val,b/val", "output_dir=runs/x",
                                  "teacher.cache=cache/t", "deepspeed.config_file=ds.json"] )
    assert cfg.resolve_path(cfg.data.train) == str(tmp_path / "shards" / "train")
    assert cfg.data.val == f"{tmp_path}/a/val,{tmp_path}/b/val"
    assert cfg.resolve_path(cfg.output_dir) == str(tmp_path / "runs" / "x")
    assert cfg.teacher.cache == str(tmp_path / "cache" / "t")
    assert cfg.deepspeed.config_file == str(tmp_path / "ds.json")


def test_config_error_for_a_missing_command_line_file_names_the_working_directory_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=f"student.model: file not found: {tmp_path}/models/s.yaml"):
        load_config(TINY_TEXT, ["student.model=models/s.yaml"])


def test_model_file_paths_resolve_against_the_model_file(tmp_path, monkeypatch):
    models = tmp_path / "cfg" / "models"
    models.mkdir(parents=True)
    (models / "student.yaml").write_text(yaml.safe_dump({"type": "causal_lm", "tokenizer": {"path": "../tok"},
                                                         "llm": {"path": "weights"}}))
    (tmp_path / "cfg" / "run.yaml").write_text(yaml.safe_dump({"student": {"model": "models/student.yaml"},
                                                               "loss": {"name": "ce"}, "data": {"train": "x"}}))
    monkeypatch.chdir(tmp_path)
    cfg = load_config(tmp_path / "cfg" / "run.yaml")
    assert cfg.student.model["tokenizer"]["path"] == str(tmp_path / "cfg" / "tok")
    assert cfg.student.model["llm"]["path"] == str(models / "weights")
    cfg = load_config(tmp_path / "cfg" / "run.yaml", ["student.model.llm.path=here/w"])
    assert cfg.student.model["llm"]["path"] == str(tmp_path / "here" / "w")


def test_overrides_reach_into_a_model_file():
    cfg = load_config(TINY_TEXT, ["student.model.llm.config.hidden_size=32", "teacher.model.llm.config.num_hidden_layers=1"])
    assert cfg.student.model["llm"]["config"]["hidden_size"] == 32
    assert cfg.teacher.model["llm"]["config"]["num_hidden_layers"] == 1
    assert cfg.teacher.model["llm"]["config"]["hidden_size"] == 128  # the rest of the file is kept


def test_loss_name_override_drops_the_file_params_the_new_loss_does_not_take(caplog):
    cfg = load_config(TINY_TEXT, ["loss.name=fkl"])
    assert cfg.loss.name == "fkl" and cfg.loss.params == {}
    assert "alpha, beta, t_end, t_start from the config file do not apply to loss 'fkl'" in caplog.text
    cfg = load_config(TINY_TEXT, ["loss.name=sfkl"])
    assert cfg.loss.params == {}
    # Parameters the user gave on the command line stay checked: a wrong one is an error.
    with pytest.raises(ConfigError, match="loss.params"):
        load_config(TINY_TEXT, ["loss.name=fkl", "loss.params.t_start=0.2"])
    # A loss named in the file with params it does not take is still an error.
    with pytest.raises(ConfigError, match="loss.params"):
        load_config(TINY_TEXT, ["loss.name=fkl", "loss.params={skew: 0.1}"])


def test_unknown_hugging_face_config_keys_are_errors():
    from taid_vlm.train.preflight import check_hf_config, check_model_sections

    cfg = load_config(TINY_TEXT, ["teacher.model.llm.config.num_hiden_layers=2"])
    with pytest.raises(ConfigError, match=r"teacher.model.llm.config.num_hiden_layers: unknown key for Qwen2Config; "
                                          r"did you mean num_hidden_layers\? known: .*hidden_size"):
        check_model_sections(cfg)
    check_model_sections(load_config(TINY_TEXT))  # the shipped recipe passes
    # Nested sub-configs of a VLM are checked against their own classes; HF's own defaults pass.
    from transformers import CONFIG_MAPPING

    for model_type in ("qwen2_vl", "llava", "idefics3", "gemma3", "internvl"):
        check_hf_config(CONFIG_MAPPING[model_type]().to_dict(), model_type)
    with pytest.raises(ConfigError, match=r"m.text_config.hiden_size: unknown key for Qwen2VLTextConfig"):
        check_hf_config({"model_type": "qwen2_vl", "text_config": {"hiden_size": 8}}, "m")


def test_one_voice_for_user_errors_and_debug_shows_the_traceback(tmp_path, capsys):
    from taid_vlm.cli import main

    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert capsys.readouterr().err.strip() == f"error: config file not found: {tmp_path / 'nope.yaml'}"
    with pytest.raises(ConfigError, match="config file not found"):
        main(["train", str(tmp_path / "nope.yaml"), "--debug"])
    with pytest.raises(ConfigError, match="config file not found"):
        main(["--debug", "train", str(tmp_path / "nope.yaml")])
    assert main(["train", str(TINY_TEXT), "train.precision=fp16"]) == 2
    assert capsys.readouterr().err.strip() == "error: must be one of fp32, bf16, got 'fp16' (train.precision)"
    assert main(["export", str(tmp_path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no complete checkpoint") and err.endswith(f"({tmp_path})") and "\n" not in err


def test_an_sft_run_checks_the_paths_of_the_teacher_it_builds_for_evaluation(tmp_path):
    """Loss `ce` with `teacher.model` given builds that teacher (to evaluate against), so preflight checks its
    paths too: one line naming the key, before any model is built (it used to skip them: `!= "ce"`)."""
    from taid_vlm.train.preflight import check_model_sections

    missing = tmp_path / "no_teacher_tokenizer"
    cfg = load_config(TINY_TEXT, ["loss.name=ce", f"teacher.model.tokenizer.path={missing}"])
    assert cfg.teacher_use() == "evaluation" and cfg.builds_teacher_model()
    with pytest.raises(ConfigError, match=f"^teacher.model.tokenizer.path: not found: {missing}$"):
        check_model_sections(cfg)


def test_what_the_teacher_is_for_is_said_once(tmp_path):
    """RunConfig.teacher_use: the one home of 'does this run need a teacher, and which' (model building,
    the cache, preflight and validation all ask it)."""
    (tmp_path / "manifest.json").write_text("{}")
    cases = {(): "loss", ("teacher.cache=" + str(tmp_path),): "cache", ("loss.name=ce",): "evaluation",
             ("loss.name=ce", "teacher.model=null"): None, ("loss.name=ce", "teacher.cache=" + str(tmp_path)): "evaluation"}
    for overrides, use in cases.items():
        cfg = load_config(TINY_TEXT, list(overrides))
        assert (cfg.teacher_use(), cfg.builds_teacher_model()) == (use, use in ("loss", "evaluation")), overrides
    with pytest.raises(ConfigError, match="^teacher.model: required by loss 'taid'"):
        load_config(TINY_TEXT, ["teacher.model=null"])


def test_shard_specs_follow_one_rule_and_are_expanded_once(tmp_path):
    """A comma-separated string and a list give the same shards; a brace pattern keeps its commas."""
    from taid_vlm.train.preflight import shard_lists

    for name in ("a-0.tar", "a-1.tar", "b-0.tar"):
        (tmp_path / name).write_bytes(b"")
    as_text = load_config(TINY_TEXT, [f"data.train={tmp_path}/a-0.tar,{tmp_path}/b-0.tar", "data.val=null"])
    as_list = load_config(TINY_TEXT, [f"data.train=[{tmp_path}/a-0.tar, {tmp_path}/b-0.tar]", "data.val=null"])
    braces = load_config(TINY_TEXT, [f"data.train={tmp_path}/a-{{0,1}}.tar", f"data.val={tmp_path}/b-0.tar"])
    assert as_text.shard_spec("train") == as_list.shard_spec("train") == [f"{tmp_path}/a-0.tar", f"{tmp_path}/b-0.tar"]
    assert shard_lists(as_text) == shard_lists(as_list) == {"train": [f"{tmp_path}/a-0.tar", f"{tmp_path}/b-0.tar"]}
    assert shard_lists(braces) == {"train": [f"{tmp_path}/a-0.tar", f"{tmp_path}/a-1.tar"], "val": [f"{tmp_path}/b-0.tar"]}
    with pytest.raises(ConfigError, match=f"^data.val: shard '{tmp_path}/c.tar' does not exist$"):
        shard_lists(load_config(TINY_TEXT, [f"data.val={tmp_path}/c.tar"]), ("val",))


def test_allowed_values_are_written_once_beside_each_field():
    """`one_of` fields: the dataclass holds the choices and the default, validate() reads them from there."""
    import dataclasses

    from taid_vlm.config import RunConfig, TeacherConfig

    assert TeacherConfig().placement == "replicated"
    assert dataclasses.fields(TeacherConfig)[1].metadata["choices"] == ("replicated", "zero3")
    for override, message in (("optim.schedule=step", "optim.schedule: must be one of cosine, linear, constant, got 'step'"),
                              ("data.synthetic.kind=dots", "data.synthetic.kind: must be one of shapes, shapes_text, got 'dots'"),
                              ("sampling.replay_ratio=up", "sampling.replay_ratio: must be one of decreasing, constant, "
                                                           "increasing, got 'up'")):
        with pytest.raises(ConfigError, match=f"^{message}$"):
            load_config(TINY_TEXT, [override])
    assert RunConfig().sampling.mode == "off" and RunConfig().deepspeed.zero_stage == 0


def test_teacher_dtype_names_are_the_model_dtype_names():
    """One list of dtype names (models/config_checks.py:resolve_dtype): teacher.dtype takes the same ones."""
    from taid_vlm.train.preflight import check_model_sections

    check_model_sections(load_config(TINY_TEXT, ["teacher.dtype=bf16"]))
    with pytest.raises(ConfigError, match=r"^teacher.dtype: unknown dtype 'half'; choose from \['bf16', 'bfloat16'"):
        check_model_sections(load_config(TINY_TEXT, ["teacher.dtype=half"]))
