"""The seven zero-shot tasks as lm-evaluation-harness defines them: prompts, choices, gold, metrics.

Each builder turns one row of the local benchmark file into an ``MCExample``: the
(context, continuation) pairs to score, the gold index, and the choice strings whose character
lengths ``acc_norm`` divides by. Formats follow lm-eval 0.4's task YAMLs (``super_glue/boolq``,
``piqa``, ``hellaswag``, ``winogrande``, ``arc``, ``mmlu/default``); the target delimiter is one space.
``tests/test_eval_lmeval.py`` checks every request string against lm-eval's own task objects.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from archquant.data.files import DataFormatError

TARGET_DELIMITER = " "


@dataclass(frozen=True)
class MCExample:
    """One multiple-choice question as loglikelihood requests.

    Attributes:
        requests: one ``(context, continuation)`` per choice; the continuation starts with the delimiter.
        gold: index of the correct choice.
        choices: the strings whose character length normalises ``acc_norm`` (lm-eval's ``doc_to_choice``).
    """

    requests: tuple[tuple[str, str], ...]
    gold: int
    choices: tuple[str, ...]


def _single_context(context: str, choices: list[str], gold: int) -> MCExample:
    reqs = tuple((context, f"{TARGET_DELIMITER}{c}") for c in choices)
    return MCExample(requests=reqs, gold=gold, choices=tuple(choices))


def boolq(doc: dict) -> MCExample:
    """``{passage}\\nQuestion: {question}?\\nAnswer:`` -> " no" / " yes" (label True = yes)."""
    context = f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:"
    return _single_context(context, ["no", "yes"], int(bool(doc["label"])))


def piqa(doc: dict) -> MCExample:
    """``Question: {goal}\\nAnswer:`` -> " {sol1}" / " {sol2}"."""
    return _single_context(f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], int(doc["label"]))


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag ``preprocess`` (WikiHow bracket artefacts removed, spaces collapsed)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_context(ctx: str) -> str:
    """Rebuild lm-eval's ``ctx_a + " " + ctx_b.capitalize()`` from the derived file's joined ``ctx``.

    The local file (see its SOURCE.md) only has ``ctx = ctx_a + " " + ctx_b``. In ActivityNet rows
    ``ctx_b`` is the lower-case sentence start after the last ". " (e.g. "... a sink. the man"); in
    WikiHow rows it is empty and the context ends with a full sentence. So: when the text after the
    last ". " starts lower-case, capitalise it as lm-eval does; otherwise leave the context alone.
    """
    head, sep, tail = ctx.rpartition(". ")
    if sep and tail[:1].islower():
        return head + sep + tail.capitalize()
    if not sep and ctx[:1].islower():  # ctx_a empty: the whole context is ctx_b
        return ctx.capitalize()
    return ctx


def hellaswag(doc: dict) -> MCExample:
    """``preprocess({activity_label}: {ctx})`` -> " {preprocess(ending)}" x 4."""
    query = hellaswag_preprocess(f"{doc['activity_label']}: {hellaswag_context(doc['ctx'])}")
    choices = [hellaswag_preprocess(e) for e in doc["endings"]]
    return _single_context(query, choices, int(doc["label"]))


def winogrande(doc: dict) -> MCExample:
    """Partial scoring: one context per option (sentence up to the blank, option filled in), the
    same continuation (the rest of the sentence) scored under each."""
    sentence = doc["sentence"]
    idx = sentence.index("_")
    contexts = [sentence[:idx] + doc["option1"], sentence[:idx] + doc["option2"]]
    continuation = f"{TARGET_DELIMITER}{sentence[idx + 1:].strip()}"
    gold = {"1": 0, "2": 1}[str(doc["answer"])]
    return MCExample(requests=tuple((c, continuation) for c in contexts), gold=gold, choices=tuple(contexts))


def arc(doc: dict) -> MCExample:
    """``Question: {stem}\\nAnswer:`` -> " {choice text}" per choice (3-5 choices)."""
    q = doc["question"]
    labels = [c["label"] for c in q["choices"]]
    return _single_context(f"Question: {q['stem']}\nAnswer:", [c["text"] for c in q["choices"]], labels.index(doc["answerKey"]))


def mmlu(doc: dict) -> MCExample:
    """0-shot MMLU with lm-eval's per-subject description; the choices are the letters " A".." D"."""
    subject = " ".join(doc["subject"].split("_"))
    description = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
    c = doc["choices"]
    body = f"{doc['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:"
    answer = doc["answer"]
    gold = "ABCD".index(answer) if isinstance(answer, str) else int(answer)
    return _single_context(description + body, ["A", "B", "C", "D"], gold)


@dataclass(frozen=True)
class TaskSpec:
    """How a task is scored: its builder and whether lm-eval reports ``acc_norm`` for it."""

    name: str
    build: Callable[[dict], MCExample]
    has_acc_norm: bool

    @property
    def headline(self) -> str:
        """The metric quoted for this task (lm-eval's customary one)."""
        return "acc_norm" if self.has_acc_norm else "acc"


TASK_SPECS: dict[str, TaskSpec] = {
    "boolq": TaskSpec("boolq", boolq, has_acc_norm=False),
    "piqa": TaskSpec("piqa", piqa, has_acc_norm=True),
    "hellaswag": TaskSpec("hellaswag", hellaswag, has_acc_norm=True),
    "winogrande": TaskSpec("winogrande", winogrande, has_acc_norm=False),
    "arc_easy": TaskSpec("arc_easy", arc, has_acc_norm=True),
    "arc_challenge": TaskSpec("arc_challenge", arc, has_acc_norm=True),
    "mmlu": TaskSpec("mmlu", mmlu, has_acc_norm=False),
}


def build_examples(task: str, rows) -> list[MCExample]:
    """Turn benchmark rows into scored examples; a row that cannot be built names its index."""
    spec = TASK_SPECS[task]
    out = []
    for i, row in enumerate(rows):
        try:
            out.append(spec.build(row))
        except (KeyError, ValueError, IndexError, TypeError) as err:
            raise DataFormatError(f"{task}: row {i} cannot be turned into a prompt ({type(err).__name__}: {err})") from err
    return out
