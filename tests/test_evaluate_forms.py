"""eval's referring section by form: expressions drawn form first, each form sampled equally."""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np

from omg_llava_ros.toyworld.conversations import REFERRING_TEMPLATES
from omg_llava_ros.training.evaluate import FORMS, evaluate

# toyworld.md's forms, recognised from the expression text.
_FORM_PATTERNS = (
    (6, r"the (largest|smallest) object"),
    (5, r"the \w+ (left of|right of|above|below) the \w+ \w+"),
    (4, r"the (leftmost|rightmost|topmost|bottommost) .+"),
    (2, r"the (small|medium|large) \w+ \w+"),
    (3, r"the \w+( object)?"),
    (1, r"the \w+ \w+"),
)


def _form(expression: str) -> int:
    return next(form for form, pattern in _FORM_PATTERNS if re.fullmatch(pattern, expression))


class _Recorder:
    """Answers every question with its expression and no mask; records the questions."""

    def __init__(self) -> None:
        self.questions: list[str] = []

    def chat(self, image, question, **_):
        self.questions.append(question)
        return SimpleNamespace(text="", segments=[])


def _expression(question: str) -> tuple[str, str]:
    for template in REFERRING_TEMPLATES:
        head, tail = template.split("{ref}")
        if question.startswith(head) and question.endswith(tail):
            return template, question[len(head) : len(question) - len(tail)]
    raise AssertionError(f"no template made {question!r}")


def test_each_form_gets_its_samples_and_every_template_is_counted():
    model = _Recorder()
    out = evaluate(model, samples=4, seed=3, sections=("referring_forms",))["referring_forms"]
    assert out["overall"]["n"] == 4
    assert {int(k) for k in out["by_form"]} == set(FORMS)
    per_form = model.questions[4:]
    assert len(per_form) == 4 * len(FORMS)
    for i, form in enumerate(FORMS):
        for question in per_form[4 * i : 4 * (i + 1)]:
            assert _form(_expression(question)[1]) == form, question
        assert out["by_form"][str(form)]["n"] == 4
        # No mask for a non-empty target: every IoU is 0.
        assert out["by_form"][str(form)]["ciou"] == 0.0
    templates = [_expression(q)[0] for q in model.questions]
    assert sum(v["n"] for v in out["by_template"].values()) == len(model.questions)
    for template, figures in out["by_template"].items():
        assert figures["n"] == templates.count(template)


def test_the_headline_draws_forms_uniformly_not_the_shortest_expression():
    model = _Recorder()
    evaluate(model, samples=120, seed=5, sections=("referring_forms",))
    forms = [_form(_expression(q)[1]) for q in model.questions[:120]]
    counts = np.bincount(forms, minlength=7)[1:]
    # Every form is drawn; the spatial ones (4-6), which the shortest expression almost never is,
    # make up a good part of the headline.
    assert (counts > 0).all(), counts
    assert counts[3:].sum() > 120 * 0.3, counts


def test_the_probe_sorts_every_failure_into_one_cause():
    from omg_llava_ros import OmgLlava
    from omg_llava_ros.training.referring_probe import probe

    model = OmgLlava.from_pretrained()
    original = model._seg_points
    report = probe(model, samples=3, seed=1)
    assert "_seg_points" not in vars(model) and model._seg_points == original  # the hook is gone
    assert set(report) == {str(f) for f in FORMS}
    for figures in report.values():
        assert figures["samples"] == 3 and 0.0 <= figures["ciou"] <= 1.0
        assert sum(figures["causes"].values()) == figures["failures"] <= 3
