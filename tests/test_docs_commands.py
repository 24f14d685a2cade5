"""Every shell command in README.md and docs/*.md is run (or, where it needs hardware CI lacks, parsed and
its config loaded) with tiny settings, so the docs cannot drift from the code.

Commands are the lines of fenced code blocks tagged bash/sh/shell/console, and of untagged blocks whose
first line starts with a program (python, taid-vlm, deepspeed, make, a path to one, ``VAR=value``
first); ``\\`` continues a line, ``# ...`` is a comment, ``[--flag]`` stands for two commands (with and
without the flag). Each command must match exactly one rule of RULES below: a command with no rule
fails ``test_every_docs_command_has_a_rule``, so a new docs command needs a rule here. A rule says how
the command is run and which tiny settings are substituted (fewer steps / samples, placeholders such as
DIR filled in). Fast rules run in ``test_docs_commands_run`` in document order inside ONE workspace
(a copy of configs/, so relative paths resolve as in a checkout, and nothing is written into the repo):
later commands reuse what earlier ones wrote (the tiny run that --resume and export continue, the
shards check_shards reads). Rules marked slow (multi-process launches, benchmarks, the demo + compare)
run in ``test_docs_commands_run_slow``; in the fast test they are parsed and their configs loaded. Slow
commands that come to the same tiny command share one run (``Workspace.run_once``), and the demo teacher
the compare commands need is the session's ``demo_quick`` run (tests/conftest.py), not a second demo.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import pytest

from tests.train_helpers import env as subprocess_env

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_TAGS = {"bash", "sh", "shell", "console", "zsh"}
PROGRAM = re.compile(r"^(\S*/)?(python\d*(\.\d+)?|taid-vlm|deepspeed|torchrun|make|pip|bash)$")
ENV_ASSIGN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=\S*$")
TIMEOUT = 1800


# -- extraction ---------------------------------------------------------------------------------------
@dataclass
class Command:
    where: str  # file:line
    argv: List[str]  # program normalised (.venv/bin/taid-vlm -> taid-vlm), env assignments removed
    env: Dict[str, str] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return " ".join(self.argv)


def _blocks(path: Path):
    """(first line number, language tag, lines) of each fenced code block."""
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^\s*(```+|~~~+)\s*([\w+-]*)", lines[i])
        if m:
            fence, tag, start, body = m.group(1), m.group(2).lower(), i + 2, []
            i += 1
            while i < len(lines) and not lines[i].strip().startswith(fence):
                body.append(lines[i])
                i += 1
            yield start, tag, body
        i += 1


def _split(line: str) -> List[str]:
    return shlex.split(line, comments=True)


def _is_shell(tag: str, body: List[str]) -> bool:
    if tag in SHELL_TAGS:
        return True
    if tag:
        return False
    first = next((ln for ln in body if ln.strip()), "")
    try:
        words = [w for w in _split(first) if not ENV_ASSIGN.match(w)]
    except ValueError:
        return False
    return bool(words) and bool(PROGRAM.match(words[0]))


def _variants(argv: List[str]) -> List[List[str]]:
    """``[--flag]`` (doc notation for an optional flag) -> the command without it and with it."""
    for i, w in enumerate(argv):
        if w.startswith("[") and w.endswith("]"):
            inner = w[1:-1].split()
            return [v for rest in _variants(argv[i + 1:]) for v in (argv[:i] + rest, argv[:i] + inner + rest)]
    return [argv]


def extract_commands(path: Path) -> List[Command]:
    out = []
    rel = path.relative_to(REPO)
    for start, tag, body in _blocks(path):
        if not _is_shell(tag, body):
            continue
        logical, first = "", None
        for n, line in enumerate(body, start):
            if first is None:
                first = n
            if line.rstrip().endswith("\\"):
                logical += line.rstrip()[:-1] + " "
                continue
            logical += line
            words = _split(logical)
            env = {}
            while words and ENV_ASSIGN.match(words[0]):
                k, v = words.pop(0).split("=", 1)
                env[k] = v
            if words:
                words[0] = re.sub(r"^(\./)?\.venv/bin/", "", words[0])
                for v in _variants(words):
                    out.append(Command(f"{rel}:{first}", v, env))
            logical, first = "", None
    return out


def all_commands() -> List[Command]:
    return [c for p in DOCS for c in extract_commands(p)]


# -- running ------------------------------------------------------------------------------------------
class Workspace:
    """A scratch checkout: configs/ copied, benchmarks/ linked; commands run from here."""

    def __init__(self, root: Path):
        self.root = root
        shutil.copytree(REPO / "configs", root / "configs")
        (root / "benchmarks").symlink_to(REPO / "benchmarks")
        self.n = 0
        self.done: Dict[tuple, subprocess.CompletedProcess] = {}
        self.demo: Optional[Path] = None  # the slow test's finished `taid-vlm demo --quick` (demo_quick fixture)

    def env(self, extra: Optional[dict] = None) -> dict:
        # DeepSpeed JIT-builds its CPU comm op per process start unless it finds its build: a build folder
        # of this test's own (per Python environment) saves minutes per command on a shared machine.
        ext = os.environ.get("TORCH_EXTENSIONS_DIR") or str(
            Path(tempfile.gettempdir()) / f"taid_vlm_docs_torch_ext_{hashlib.sha1(sys.prefix.encode()).hexdigest()[:10]}")
        return {**subprocess_env(), "TORCH_EXTENSIONS_DIR": ext,
                "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), **(extra or {})}

    def run(self, argv: List[str], env: Optional[dict] = None, cwd: Optional[Path] = None) -> subprocess.CompletedProcess:
        prog = {"python": [sys.executable], "taid-vlm": [str(BIN / "taid-vlm")], "deepspeed": [str(BIN / "deepspeed")]}
        head = prog.get(argv[0], [argv[0]])
        if argv[0].endswith(".py"):
            head = [sys.executable, argv[0]]
        proc = subprocess.run(head + argv[1:], cwd=str(cwd or self.root), env=self.env(env), capture_output=True,
                              text=True, timeout=TIMEOUT)
        if proc.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        return proc

    def run_once(self, argv: List[str], env: Optional[dict] = None, cwd: Optional[Path] = None) -> subprocess.CompletedProcess:
        """Docs commands that come to the same tiny command (cache_bench.py twice, the demo compare in README
        and docs/results.md) share one run, its checks made again on what it wrote."""
        key = (tuple(argv), tuple(sorted((env or {}).items())), str(cwd or self.root))
        if key not in self.done:
            self.done[key] = self.run(argv, env, cwd)
        return self.done[key]

    def fresh(self, name: str) -> str:
        self.n += 1
        return f"runs/docs_{name}_{self.n}"


def _opt(argv: List[str], flag: str) -> Optional[str]:
    return argv[argv.index(flag) + 1] if flag in argv else None


def _set(argv: List[str], flag: str, value: str) -> List[str]:
    """``flag value`` replaced (or appended)."""
    argv = list(argv)
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    return argv


QUIET = ["train.progress_bar=false", "train.tensorboard=false"]


def run_train(cmd: Command, ws: Workspace) -> None:
    """One tiny training run: 2 steps (3 when resuming); a fresh --output-dir when the command gives none."""
    argv = list(cmd.argv)
    if "--output-dir" not in argv:
        argv = _set(argv, "--output-dir", ws.fresh("train"))
    argv = _set(argv, "--max-steps", "3" if "--resume" in argv else "2") + QUIET
    ws.run(argv, cmd.env)
    out = ws.root / _opt(argv, "--output-dir")
    steps = [json.loads(x).get("step") for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert max(s for s in steps if s is not None) == int(_opt(argv, "--max-steps")), cmd.where


def load_train_config(cmd: Command, ws: Workspace) -> None:
    """Parse as the launcher and the trainer do, and load + validate the config; nothing is built."""
    from deepspeed.launcher.runner import parse_args

    from taid_vlm.cli import build_parser
    from taid_vlm.config import load_config

    argv = cmd.argv[1:] if cmd.argv[0] == "deepspeed" else cmd.argv[2:]
    if cmd.argv[0] == "deepspeed":
        launch = parse_args(argv)
        assert launch.module and launch.user_script == "taid_vlm.train", cmd.where
        argv = launch.user_args
    args, extra = build_parser().parse_known_args(["train", *argv])
    assert all("=" in x for x in extra), (cmd.where, extra)
    cwd = os.getcwd()
    os.chdir(ws.root)
    try:
        load_config(args.config, list(args.overrides) + extra)
    finally:
        os.chdir(cwd)


def run_deepspeed_tiny(cmd: Command, ws: Workspace) -> None:
    from taid_vlm.train.launch_env import free_port

    argv = _set(_set(list(cmd.argv), "--master_port", str(free_port())), "--max-steps", "2") + QUIET
    ws.run(argv, cmd.env)


def run_export(cmd: Command, ws: Workspace) -> None:
    ws.run(cmd.argv, cmd.env)
    out = ws.root / cmd.argv[-1]
    assert any(out.rglob("*.safetensors")), f"{cmd.where}: export wrote no weights into {out}"


def run_eval(cmd: Command, ws: Workspace) -> None:
    """lm-eval on the export an earlier command wrote (the task folder is the repo's); scores land in --run."""
    argv = [str(REPO / a) if a.startswith("tests/") else a for a in cmd.argv]
    ws.run(argv, cmd.env)
    records = [json.loads(x) for x in (ws.root / _opt(argv, "--run") / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_harness/shapes_count/acc" in r for r in records), cmd.where


def run_cache_teacher(cmd: Command, ws: Workspace) -> None:
    ws.run(cmd.argv, cmd.env)
    assert (ws.root / _opt(cmd.argv, "--out") / "manifest.json").is_file(), cmd.where


def run_make_shards(cmd: Command, ws: Workspace) -> None:
    """DIR -> a folder of 3 captioned images made here."""
    from PIL import Image

    images = ws.root / "docs_images"
    images.mkdir(exist_ok=True)
    for i in range(3):
        Image.new("RGB", (16, 16), (80 * i, 40, 200)).save(images / f"img{i}.jpg")
        (images / f"img{i}.txt").write_text(f"a picture number {i}")
    argv = [str(images) if w == "DIR" else w for w in cmd.argv]
    ws.run(argv, cmd.env)


def run_check_shards(cmd: Command, ws: Workspace) -> None:
    """The brace range is cut to the one shard the make_shards command above wrote."""
    argv = [re.sub(r"\{(0+)\.\.0*\d+\}", r"{\1..\1}", w) for w in cmd.argv]
    proc = ws.run(argv, cmd.env)
    if "--json" in argv:
        assert json.loads(proc.stdout)["samples"] == 3, cmd.where


def run_synth_shapes(cmd: Command, ws: Workspace) -> None:
    """--n 20, and each variant into its own folder."""
    argv = _set(_set(list(cmd.argv), "--n", "20"), "--out", ws.fresh("synth"))
    ws.run(argv, cmd.env)
    assert (ws.root / _opt(argv, "--out") / "manifest.json").is_file(), cmd.where


def make_dry_run(cmd: Command, ws: Workspace) -> None:
    """`make X` installs and runs for minutes: `make -n X` checks the target exists and what it runs."""
    proc = ws.run(["make", "-n", *cmd.argv[1:]], cwd=REPO)
    assert {"demo": "demo", "test": "pytest"}.get(cmd.argv[1], "") in proc.stdout, cmd.where


def help_only(cmd: Command, ws: Workspace) -> None:
    """Scripts whose real run is slow or needs a GPU: their command line parses (--help)."""
    script = next(w for w in cmd.argv if w.endswith(".py"))
    ws.run([script, "--help"], cwd=REPO)


def run_benchmark(cmd: Command, ws: Workspace) -> None:
    """Benchmarks at toy sizes (the docs give the real ones), from the repo root as documented."""
    script = Path(cmd.argv[1] if cmd.argv[0].startswith("python") else cmd.argv[0]).name
    tiny = {
        "loss_bench.py": ["--sizes", "32x16x16", "--vocab", "512", "--reps", "1"],
        "data_bench.py": ["--n", "8", "--sizes", "32"],
        "lora_memory_bench.py": ["--hidden", "64", "--layers", "1", "--r", "2", "--steps", "2",
                                 "--out", str(ws.root / "lora_bench")],
        "train_bench.py": ["--steps", "3", "--warmup", "1"],
        # each loss's 4 runs (one per cache format) once: TAID here, RKL in cache_e2e.py below
        "cache_bench.py": ["--steps", "5",  # it drops the first 3 steps
                           "--out", str(ws.root / "cache_bench"), "--fidelity-tokens", "2",
                           "--e2e-steps", "2", "--teacher-steps", "2", "--e2e-losses", "taid"],
        # the docs run it on the real-text bed (--text-bed .), which a test workspace has not built: the tiny bed,
        # in cache_bench.py's e2e folder (its teacher and caches reused)
        "cache_e2e.py": ["--steps", "2", "--teacher-steps", "2", "--losses", "rkl",
                         "--out", str(ws.root / "cache_bench" / "e2e")],
    }[script]
    if "--gpu" in cmd.argv:
        import torch

        if not torch.cuda.is_available():
            return help_only(Command(cmd.where, [f"benchmarks/{script}"]), ws)
        tiny = ["--gpu", "--steps", "3", "--warmup", "1"]
    if "--qwen" in cmd.argv:  # data_bench.py --qwen: the Qwen2.5-VL processor path and its fast path
        tiny = ["--qwen", "--n", "4", "--rounds", "1"]
    ws.run_once([f"benchmarks/{script}", *tiny], cmd.env, cwd=ws.root)


def run_data_io(cmd: Command, ws: Workspace) -> None:
    """Toy sizes: 4 shards of 10 samples, W = 1 and 2 with 2 workers; --startup with 20 shards."""
    if "--startup" in cmd.argv:
        tiny, says = ["--startup", "20", "--data", str(ws.root / "data_io_startup")], "20 indexed shards: build_loader"
    elif "--shuffle-quality" in cmd.argv:
        tiny, says = ["--shuffle-quality"], "distinct shards per global batch of 64"
    else:
        tiny = ["--worlds", "1", "2", "--workers", "2", "--shards", "4", "--per-shard", "10", "--shuffle-buffer", "10",
                "--warm", "1", "--steps", "2", "--data", str(ws.root / "data_io")]
        says = "worst rank"
    proc = ws.run(["benchmarks/data_io.py", *tiny], cmd.env, cwd=ws.root)
    assert says in proc.stdout, f"{cmd.where}: {proc.stdout[-500:]}"


def run_companion_io(cmd: Command, ws: Workspace) -> None:
    """Toy sizes: 3 shards of 8 samples, 2 micro-batches counted."""
    argv = ["benchmarks/companion_io.py", "--shards", "3", "--per-shard", "8", "--steps", "2",
            "--out", str(ws.root / "companion_io")]
    proc = ws.run(argv, cmd.env, cwd=ws.root)
    assert all(proc.stdout.count(f" {name} ") == 2 for name in ("gzip", "records", "plain")), proc.stdout[-500:]


def run_index_shards(cmd: Command, ws: Workspace) -> None:
    """DIR -> two small shards written here; a remote URL: the command line parses (--help)."""
    if any("://" in w for w in cmd.argv):
        ws.run(["python", "-m", "data_tools.index_shards", "--help"], cwd=REPO)
        return
    import webdataset as wds

    folder = ws.root / "docs_index"
    if not folder.exists():
        folder.mkdir()
        for s in range(2):
            with wds.TarWriter(str(folder / f"shard-{s:06d}.tar")) as w:
                for i in range(3):
                    w.write({"__key__": f"s{s}_{i}", "txt": b"a doc"})
    ws.run([w.replace("DIR", str(folder)) for w in cmd.argv], cmd.env)


def parse_compare(cmd: Command, ws: Workspace) -> None:
    from taid_vlm.cli import build_parser
    from taid_vlm.experiments.compare import is_study, load_study

    args, _ = build_parser().parse_known_args(cmd.argv[1:])
    assert args.command == "compare"
    config = ws.root / args.config
    if is_study(config):
        load_study(config)


def run_compare_demo(cmd: Command, ws: Workspace) -> None:
    """The demo's teacher first (`taid-vlm demo --quick`: the session's run, copied to runs/demo), then 1 seed x
    2 steps of two of the losses."""
    if not (ws.root / "runs/demo").is_dir():
        shutil.copytree(ws.demo, ws.root / "runs/demo")
    argv = _set(_set(_set(list(cmd.argv), "--seeds", "1"), "--steps", "2"), "--losses", "taid,fkl")
    ws.run_once(argv, cmd.env)
    assert (ws.root / _opt(argv, "--out") / "compare.md").is_file(), cmd.where


def run_text_corpus(cmd: Command, ws: Workspace) -> None:
    """Three small installed packages and a 512-token vocabulary instead of the documented ten (~18 MB)."""
    argv = _set(_set(_set(list(cmd.argv), "--packages", "yaml,click,jinja2"), "--vocab-size", "512"),
                "--val-fraction", "0.2")
    ws.run(argv, cmd.env)
    assert (ws.root / _opt(argv, "--out") / "tokenizer" / "tokenizer.json").is_file(), cmd.where


@dataclass
class Rule:
    pattern: str  # re.fullmatch against the command text
    run: Callable[[Command, Workspace], None]
    slow: bool = False
    fast_check: Optional[Callable[[Command, Workspace], None]] = None  # what the fast test does for a slow rule


TINY = r"configs/tiny_(vlm|text)\.yaml"
RULES = [
    Rule(r"make (demo|test|test-e2e)", make_dry_run),
    Rule(rf"taid-vlm train {TINY}( .*)?", run_train),
    Rule(r"deepspeed --num_gpus 8 --module taid_vlm\.train configs/\S+\.yaml( .*)?", load_train_config),
    Rule(rf"deepspeed --num_gpus 2 --master_port \d+ --module taid_vlm\.train {TINY}( .*)?", run_deepspeed_tiny,
         slow=True, fast_check=load_train_config),
    Rule(r"taid-vlm export runs/\S+ \S+", run_export),
    Rule(r"taid-vlm eval runs/\S+ --tasks shapes_count --include-path tests/data/lm_eval_tasks --run runs/\S+", run_eval),
    Rule(rf"python -m data_tools\.cache_teacher {TINY} .*--out \S+.*", run_cache_teacher),
    Rule(r"python -m data_tools\.make_shards --image-folder DIR --out \S+", run_make_shards),
    Rule(r"python -m data_tools\.check_shards \S+( --json)?", run_check_shards),
    Rule(r"python -m data_tools\.synth_shapes --out \S+ --n \d+ --seed \d+( --text-only)?", run_synth_shapes),
    Rule(r"(python )?benchmarks/\w+_bench\.py( .*)?", run_benchmark, slow=True, fast_check=help_only),
    Rule(r"(python )?benchmarks/cache_e2e\.py( .*)?", run_benchmark, slow=True, fast_check=help_only),
    Rule(r"python benchmarks/data_io\.py( .*)?", run_data_io),
    Rule(r"python benchmarks/companion_io\.py( .*)?", run_companion_io),
    Rule(r"python -m data_tools\.index_shards .*", run_index_shards),
    Rule(r"taid-vlm compare configs/demo/distill\.yaml .*", run_compare_demo, slow=True, fast_check=parse_compare),
    # three teachers trained for 1,000 steps each: too long even for the slow tests; the study is validated
    Rule(r"taid-vlm compare configs/demo/capacity_gap\.yaml .*", parse_compare),
    # the real-text bed: the corpus (three small packages) and a 2-step teacher run on it run for real;
    # its compare runs (12 losses x 200 steps, three teachers) are far too long for a test: parsed only
    Rule(r"python -m data_tools\.text_corpus --out data/text_bed --seed \d+( .*)?", run_text_corpus),
    Rule(r"taid-vlm train configs/text_bed/teacher\.yaml --output-dir \S+( .*)?", run_train),
    Rule(r"taid-vlm compare configs/text_bed/(distill|capacity_gap)\.yaml .*", parse_compare),
]


def rule_for(cmd: Command) -> Rule:
    hits = [r for r in RULES if re.fullmatch(r.pattern, cmd.text)]
    assert len(hits) == 1, f"{cmd.where}: `{cmd.text}` matches {len(hits)} rules of tests/test_docs_commands.py"
    return hits[0]


# -- tests --------------------------------------------------------------------------------------------
def test_extraction_finds_the_documented_commands():
    texts = [c.text for c in all_commands()]
    assert "taid-vlm train configs/tiny_vlm.yaml --output-dir runs/tiny_vlm" in texts
    assert "python -m data_tools.synth_shapes --out data/shapes --n 1000 --seed 0 --text-only" in texts
    assert not any(t.startswith(("model ", "taid_vlm/")) for t in texts)  # output tables and layout trees


def test_every_docs_command_has_a_rule():
    missing = []
    for c in all_commands():
        hits = [r for r in RULES if re.fullmatch(r.pattern, c.text)]
        if len(hits) != 1:
            missing.append(f"{c.where}: `{c.text}` ({len(hits)} rules)")
    assert not missing, "docs commands without exactly one rule in tests/test_docs_commands.py:\n" + "\n".join(missing)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return Workspace(tmp_path_factory.mktemp("docs_ws"))


@pytest.mark.slow  # a few tiny training runs: 2-4 minutes on a busy 2-core machine
@pytest.mark.timeout(3600)
def test_docs_commands_run(workspace):
    """Fast rules run for real, in document order, sharing one workspace; slow ones are parsed/loaded."""
    failures = []
    for c in all_commands():
        rule = rule_for(c)
        action = (rule.fast_check or (lambda *_: None)) if rule.slow else rule.run
        try:
            action(c, workspace)
        except Exception as e:  # report every broken command, not only the first
            failures.append(f"{c.where}: `{c.text}`: {str(e)[-1500:]}")
    assert not failures, "\n\n".join(failures)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_docs_commands_run_slow(tmp_path, demo_quick):
    ws = Workspace(tmp_path)
    ws.demo = demo_quick[1]
    failures = []
    for c in all_commands():
        rule = rule_for(c)
        if not rule.slow:
            continue
        try:
            rule.run(c, ws)
        except Exception as e:
            failures.append(f"{c.where}: `{c.text}`: {str(e)[-1500:]}")
    assert not failures, "\n\n".join(failures)
