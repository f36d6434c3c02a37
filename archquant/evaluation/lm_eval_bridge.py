"""lm-evaluation-harness itself over the local benchmark files: its own task YAMLs, our data.

Each task is lm-eval's shipped config (prompt templates, choices, target, metrics, description)
with only the dataset swapped: ``dataset_path: json`` on the local file, and a ``process_docs`` that
maps the local schema to the Hugging Face schema the YAML expects (AI2 ARC -> ``ai2_arc``, letter
answers -> MMLU's integer ``answer``, HellaSwag's joined ``ctx`` -> ``ctx_a``/``ctx_b``). MMLU runs
as lm-eval does, one task per subject with that subject's description. Nothing touches the network.

This is the cross-check of archquant's native scorer (``eval.engine=lm_eval``); it needs an HF
``PreTrainedModel`` (lm-eval's ``HFLM``), while the native scorer takes any module returning logits.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Sequence

from archquant.data.benchmarks import load_benchmark
from archquant.data.config import DataConfig
from archquant.data.files import resolve_data_path, set_datasets_offline
from archquant.evaluation.tasks import TASK_SPECS
from archquant.evaluation.zero_shot import check_tasks, mean_stderr

OFFICIAL_YAML = {
    "boolq": "super_glue/boolq/default.yaml",
    "piqa": "piqa/piqa.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "winogrande": "winogrande/default.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
}
MMLU_SUBJECT_YAML = "mmlu/default/mmlu_{subject}.yaml"


def _tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def official_config(rel: str) -> dict:
    """lm-eval's shipped config of a task (includes merged, ``!function`` resolved)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(_tasks_dir() / rel, resolve_func=True, recursive=True)


def _hf_hellaswag(doc: dict) -> dict:
    # ctx = ctx_a + " " + ctx_b in the local file: split where archquant's reconstruction does
    ctx = doc["ctx"]
    head, sep, tail = ctx.rpartition(". ")
    if sep and tail[:1].islower():
        ctx_a, ctx_b = head + ".", tail
    elif not sep and ctx[:1].islower():
        ctx_a, ctx_b = "", ctx
    else:
        ctx_a, ctx_b = ctx, ""
    return {"activity_label": doc["activity_label"], "ctx_a": ctx_a, "ctx_b": ctx_b, "endings": doc["endings"], "label": str(doc["label"])}


def _hf_arc(doc: dict) -> dict:
    q = doc["question"]
    return {
        "id": doc["id"],
        "question": q["stem"],
        "choices": {"text": [c["text"] for c in q["choices"]], "label": [c["label"] for c in q["choices"]]},
        "answerKey": doc["answerKey"],
    }


def _hf_mmlu(doc: dict) -> dict:
    answer = doc["answer"]
    return {
        "question": doc["question"],
        "subject": doc["subject"],
        "choices": doc["choices"],
        "answer": "ABCD".index(answer) if isinstance(answer, str) else int(answer),
    }


TO_HF = {
    "boolq": lambda d: {**d, "label": int(bool(d["label"]))},
    "piqa": None,  # the local schema is the HF one
    "hellaswag": _hf_hellaswag,
    "winogrande": None,
    "arc_easy": _hf_arc,
    "arc_challenge": _hf_arc,
    "mmlu": _hf_mmlu,
}


def _local_task(cfg: dict, task: str, path: Path, limit: int | None, subject: str | None = None):
    from lm_eval.api.task import ConfigurableTask

    official_process = cfg.get("process_docs")
    to_hf = TO_HF[task]

    def process_docs(dataset):
        if limit is not None:
            dataset = dataset.select(range(min(limit, len(dataset))))
        if subject is not None:
            dataset = dataset.filter(lambda d: d["subject"] == subject)
        if to_hf is not None:
            dataset = dataset.map(to_hf, remove_columns=dataset.column_names)
        return official_process(dataset) if callable(official_process) else dataset

    cfg = {k: v for k, v in cfg.items() if k not in ("tag", "group", "dataset_name", "fewshot_config")}
    cfg.update(
        dataset_path="json",
        dataset_kwargs={"data_files": {"test": str(path)}},
        training_split=None,
        validation_split=None,
        test_split="test",
        fewshot_split=None,
        process_docs=process_docs,
        num_fewshot=0,
    )
    return ConfigurableTask(config=cfg)


def lm_eval_tasks(tasks: Sequence[str], data_cfg: DataConfig | None = None, limit: int | None = None) -> dict[str, list]:
    """lm-eval ``Task`` objects over the local files: ``{task: [Task, ...]}`` (MMLU: one per subject)."""
    set_datasets_offline()
    data_cfg = data_cfg or DataConfig()
    out: dict[str, list] = {}
    for task in check_tasks(tasks):
        path = resolve_data_path(data_cfg, f"task_files.{task}")
        if task == "mmlu":
            rows = load_benchmark("mmlu", data_cfg, limit=limit)
            subjects = sorted(set(rows["subject"]))
            out[task] = [
                _local_task(official_config(MMLU_SUBJECT_YAML.format(subject=s)), task, path, limit, subject=s) for s in subjects
            ]
        else:
            load_benchmark(task, data_cfg, limit=1)  # schema errors surface here, with the row and field
            out[task] = [_local_task(official_config(OFFICIAL_YAML[task]), task, path, limit)]
    return out


def run_lm_eval(
    model,
    tokenizer,
    tasks: Sequence[str],
    limit: int | None = None,
    batch_size: int = 16,
    data_cfg: DataConfig | None = None,
    *,
    return_samples: bool = False,
) -> dict:
    """Score tasks with lm-eval's ``HFLM`` on an in-memory HF model; same result layout as ``zero_shot``.

    Returns:
        ``{task: {acc, acc_stderr, acc_norm, acc_norm_stderr, n, metric, stderr, file, wall_s}}``; with
        ``return_samples`` each task also carries ``samples``: per document, lm-eval's request
        arguments and log-likelihoods (for cross-checks).
    """
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"eval.engine=lm_eval needs a transformers PreTrainedModel, got {type(model).__name__}; "
            "use eval.engine=native for supernets and other modules"
        )
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    logging.getLogger("lm_eval").setLevel(logging.WARNING)  # it logs every task's config at INFO
    data_cfg = data_cfg or DataConfig()
    task_objs = lm_eval_tasks(tasks, data_cfg, limit)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    from lm_eval.tasks import TaskManager

    # the tasks are built here, so lm-eval need not index its ~14k shipped YAMLs (minutes on a small CPU)
    manager = TaskManager(include_defaults=False)
    results = {}
    for task, objs in task_objs.items():
        t0 = time.perf_counter()
        out = lm_eval.simple_evaluate(
            model=lm, tasks=objs, num_fewshot=0, log_samples=True, bootstrap_iters=0, task_manager=manager, verbosity="WARNING"
        )
        # MMLU subtasks sort by subject name: the local file's order (subjects alphabetical, then rows)
        docs = [(name, s) for name in sorted(out["samples"]) for s in sorted(out["samples"][name], key=lambda s: s["doc_id"])]
        acc = [float(s["acc"]) for _, s in docs]
        res = {"acc": sum(acc) / len(acc), "acc_stderr": mean_stderr(acc), "acc_norm": None, "acc_norm_stderr": None}
        if TASK_SPECS[task].has_acc_norm:
            acc_norm = [float(s["acc_norm"]) for _, s in docs]
            res.update(acc_norm=sum(acc_norm) / len(acc_norm), acc_norm_stderr=mean_stderr(acc_norm))
        headline = TASK_SPECS[task].headline
        res.update(n=len(docs), metric=headline, stderr=res[f"{headline}_stderr"])
        res.update(file=str(resolve_data_path(data_cfg, f"task_files.{task}")), wall_s=round(time.perf_counter() - t0, 2))
        if return_samples:
            res["samples"] = [
                {
                    "subtask": name,
                    "doc_id": s["doc_id"],
                    "arguments": [tuple(a) for a in s["arguments"]],
                    "logprobs": [float(r[0]) for r in s["filtered_resps"]],
                }
                for name, s in docs
            ]
        results[task] = res
    return results
