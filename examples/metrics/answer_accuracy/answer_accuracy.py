"""Exact-match answer accuracy of generated continuations, with the MoRE research guide's answer extraction.

`evaluate.load("examples/metrics/answer_accuracy")` copies this file into the evaluate cache; the extraction and the
match are `more_tools.metrics.answers_match`, the one generation-based scoring uses (install the repository:
`pip install -e .`).
"""

import datasets
import evaluate

from more_tools.metrics import answers_match


_DESCRIPTION = """
Exact-match accuracy of short answers generated after an `"Answer:"` prompt (bAbI-style tasks, arithmetic, algebra).
The answer is extracted from the generated continuation as the research guide does (§7.5): the text before the first
newline, then before the first period, stripped of surrounding whitespace; prediction and reference are compared
case-insensitively.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): generated continuations (only the new text, not the prompt).
    references (`list` of `str`): gold answers.
    tasks (`list` of `str`, optional, to `compute`): the task of each example; adds a per-task breakdown.
Returns:
    exact_match (`float`): share of examples whose extracted answer equals the reference, in [0, 1].
    num_examples (`int`): how many examples were scored.
    per_task (`dict`, only with `tasks`): exact match of each task.
Examples:
    >>> metric = evaluate.load("examples/metrics/answer_accuracy")
    >>> metric.compute(predictions=[" Kitchen.\\n2 Mary", " 12"], references=["kitchen", "13"])
    {'exact_match': 0.5, 'num_examples': 2}
"""

_CITATION = """
@article{weston2015towards,
  title={Towards AI-Complete Question Answering: A Set of Prerequisite Toy Tasks},
  author={Weston, Jason and Bordes, Antoine and Chopra, Sumit and Rush, Alexander M and others},
  journal={arXiv preprint arXiv:1502.05698},
  year={2015}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class AnswerAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, tasks=None):
        hits = [
            answers_match(prediction, reference) for prediction, reference in zip(predictions, references, strict=True)
        ]
        result = {"exact_match": sum(hits) / len(hits) if hits else 0.0, "num_examples": len(hits)}
        if tasks is not None:
            per_task: dict[str, list[bool]] = {}
            for task, hit in zip(tasks, hits, strict=True):
                per_task.setdefault(task, []).append(hit)
            result["per_task"] = {task: sum(task_hits) / len(task_hits) for task, task_hits in per_task.items()}
        return result
