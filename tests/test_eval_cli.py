"""``archquant-eval``: Hydra configs compose, eval.json is written, bad input fails with a message."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from archquant.cli import CONFIG_DIR, run_verb
from archquant.commands.eval import evaluate_cli
from archquant.commands.session import load_by_name
from archquant.config import Config, register_configs, to_object
from archquant.data import DataConfig
from archquant.evaluation import EvalConfig, evaluate
from archquant.models.config import ModelConfig
from archquant.utils.errors import EXIT_USER_ERROR

REQUIRED = {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n", "stderr", "metric"}


def compose(*overrides: str) -> Config:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return to_object(hydra_compose(config_name="config", overrides=list(overrides)))


GROUP_FILES = [(g, p.stem) for g in ("eval", "data") for p in sorted((CONFIG_DIR / g).glob("*.yaml"))]


@pytest.mark.parametrize("group, name", GROUP_FILES)
def test_every_eval_and_data_yaml_composes(group, name, tmp_path):
    cfg = compose(f"{group}={name}", f"out_dir={tmp_path}")
    assert isinstance(cfg.eval, EvalConfig) and isinstance(cfg.data, DataConfig)
    assert set(cfg.data.task_files) == set(DataConfig().task_files)


def test_cli_writes_eval_json(tmp_path, capsys):
    cfg = compose("model=tiny-llama", "eval=smoke", "eval.tasks=[piqa,winogrande,mmlu]", f"out_dir={tmp_path}")
    evaluate_cli(cfg)
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["version"] == 1 and result["model"] == "tiny-llama"
    assert set(result["tasks"]) == {"piqa", "winogrande", "mmlu"}
    for task, r in result["tasks"].items():
        assert REQUIRED <= set(r) and r["n"] == 4 and 0.0 <= r["acc"] <= 1.0
    assert result["tasks"]["winogrande"]["acc_norm"] is None  # lm-eval reports acc only there
    ppl = result["perplexity"]
    assert ppl["windows"] == 2 and ppl["seq_len"] == 128 and ppl["ppl"] > 1.0
    assert {"device", "versions", "date", "argv"} <= set(result["header"])
    assert "piqa" in capsys.readouterr().out


def test_evaluate_python_api_on_a_model_in_memory(tmp_path):
    model, tok = load_by_name("tiny-llama")
    res = evaluate(model, tok, EvalConfig(tasks=["arc_easy"], limit=3, perplexity=False, progress=False), out_path=tmp_path / "e.json")
    assert res["perplexity"] is None and res["tasks"]["arc_easy"]["n"] == 3
    assert json.loads((tmp_path / "e.json").read_text())["tasks"]["arc_easy"]["acc"] == res["tasks"]["arc_easy"]["acc"]


# ---------------------------------------------------------------- bad input: a message, not a traceback


@pytest.fixture
def _cli_exit(capsys):
    def run(cfg: Config) -> str:
        with pytest.raises(SystemExit) as err:
            run_verb("eval", cfg)
        assert err.value.code == EXIT_USER_ERROR  # a one-line message on stderr, exit status 2
        err_text = capsys.readouterr().err
        assert "Traceback" not in err_text
        msg = err_text.strip().splitlines()[-1]
        assert msg.startswith("archquant-eval: ")
        return msg

    return run


def test_unknown_model_name(tmp_path, _cli_exit):
    cfg = Config(model=ModelConfig(name="no-such-model"), eval=EvalConfig(tasks=["piqa"], limit=2), out_dir=str(tmp_path))
    assert "model.name" in _cli_exit(cfg)


def test_wrong_data_root_fails_before_loading_the_model(tmp_path, _cli_exit):
    # an unknown model too: the data error must come first (it is found without loading anything)
    cfg = Config(model=ModelConfig(name="no-such-model"), data=DataConfig(root=str(tmp_path / "nowhere")), out_dir=str(tmp_path))
    msg = _cli_exit(cfg)
    assert "data.root" in msg and "data.ppl_file" in msg


def test_benchmark_row_with_a_missing_field(tmp_path, _cli_exit):
    f = tmp_path / "piqa.jsonl"
    rows = [{"goal": "g", "sol1": "a", "sol2": "b", "label": 0}, {"goal": "g", "sol1": "a", "sol2": "b"}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = Config(
        model=ModelConfig(name="tiny-llama"),
        data=DataConfig(task_files={"piqa": str(f)}),
        eval=EvalConfig(tasks=["piqa"], perplexity=False, progress=False),
        out_dir=str(tmp_path),
    )
    msg = _cli_exit(cfg)
    assert "row 1" in msg and "'label'" in msg and str(f) in msg


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"limit": 0}, "eval.limit must be > 0"),
        ({"limit": -3}, "eval.limit must be > 0"),
        ({"tasks": ["piqa", "squad"]}, "eval.tasks has unknown task(s) ['squad']"),
        ({"engine": "vllm"}, "eval.engine must be one of"),
        ({"ppl_seq_len": 1}, "eval.ppl_seq_len must be >= 2"),
    ],
)
def test_eval_config_validation(kwargs, needle):
    with pytest.raises(ValueError) as err:
        EvalConfig(**kwargs)
    assert needle in str(err.value)


def test_zero_shot_rejects_unknown_task_and_bad_limit():
    from archquant.evaluation import zero_shot

    with pytest.raises(ValueError, match="unknown task"):
        zero_shot(None, None, ["piqa", "triviaqa"])
    with pytest.raises(ValueError, match="eval.limit must be > 0"):
        zero_shot(None, None, ["piqa"], limit=0)


def test_composed_unknown_task_names_the_key(tmp_path):
    with pytest.raises(Exception, match=r"eval.tasks has unknown task\(s\) \['sqaud'\]"):
        compose("eval.tasks=[piqa,sqaud]", f"out_dir={tmp_path}")


def test_command_line_bad_input_prints_one_line(tmp_path):
    # the real entry point (Hydra + validation): one line on stderr, non-zero status, no traceback
    proc = subprocess.run(
        [sys.executable, "-c", "from archquant.cli import eval_main; eval_main()", "eval.limit=0", f"hydra.run.dir={tmp_path}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "eval.limit must be > 0" in proc.stderr and "Traceback" not in proc.stderr
    assert not (Path(tmp_path) / "eval.json").exists()


def test_commands_name_a_missing_arch_or_an_existing_export_in_one_line(tmp_path, capsys):
    """Missing and existing files are bad input too: exit 2 and the file named, no traceback."""
    from archquant.config import Config
    from archquant.distill.config import DistillConfig
    from archquant.export.config import ExportConfig

    for verb, cfg, needle in (
        ("distill", Config(model=ModelConfig(name="tiny-llama"), distill=DistillConfig(arch=str(tmp_path / "no.json")),
                           out_dir=str(tmp_path / "d")), "no.json"),
        ("export", Config(model=ModelConfig(name="tiny-llama"), export=ExportConfig(arch=str(tmp_path / "no.json")),
                          out_dir=str(tmp_path / "e")), "no.json"),
    ):
        with pytest.raises(SystemExit) as err:
            run_verb(verb, cfg)
        assert err.value.code == EXIT_USER_ERROR
        text = capsys.readouterr().err
        assert "Traceback" not in text and needle in text.strip().splitlines()[-1]
