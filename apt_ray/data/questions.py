"""Questions about a synthetic scene, answer-balanced selection, and simulated annotators."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from apt_ray.data.scenes import COLORS, MAX_OBJECTS, SHAPES, SIZES, Scene, SceneObject

COUNT_ANSWERS: tuple[str, ...] = tuple(str(n) for n in range(MAX_OBJECTS + 1))
YES_NO: tuple[str, ...] = ("yes", "no")
DIRECTIONS: tuple[str, ...] = ("left", "right", "above", "below")
ALL_ANSWERS: tuple[str, ...] = (*COLORS, *SHAPES, *COUNT_ANSWERS, *YES_NO, *DIRECTIONS)
QUESTION_TYPES: tuple[str, ...] = ("color", "shape", "count", "exists", "relation")

NUM_ANNOTATORS = 10
NOISE_RATE = 0.1  # chance that one annotator gives a wrong answer
MAX_NOISY_ANNOTATORS = 3  # so the true answer always keeps >= 7 votes (full credit)

# Balance guarantee (checked when a split is written): in any split of at least
# BALANCE_MIN_QUESTIONS questions, no ground-truth answer exceeds MAX_ANSWER_SHARE.
MAX_ANSWER_SHARE = 0.10
BALANCE_MIN_QUESTIONS = 100


@dataclass(frozen=True)
class Candidate:
    """A question one could ask about a scene, its true answer, and the answers it confuses with."""

    question_type: str
    question: str
    answer: str
    choices: tuple[str, ...]


def _unique_reference(obj: SceneObject, scene: Scene, attributes: Sequence[Sequence[str]]) -> str | None:
    """The first attribute combination naming `obj` and no other object, as a noun phrase."""
    for attrs in attributes:
        key = tuple(getattr(obj, a) for a in attrs)
        matches = sum(1 for other in scene.objects if tuple(getattr(other, a) for a in attrs) == key)
        if matches == 1:
            words = [getattr(obj, a) for a in attrs]
            return " ".join(words) if "shape" in attrs else " ".join(words) + " object"
    return None


_ANY_REF = (("shape",), ("size", "shape"), ("color", "shape"), ("size", "color", "shape"))
_NO_COLOR_REF = (("shape",), ("size", "shape"))
_NO_SHAPE_REF = (("color",), ("size", "color"))


def _color_questions(scene: Scene) -> list[Candidate]:
    out = []
    for obj in scene.objects:
        ref = _unique_reference(obj, scene, _NO_COLOR_REF)
        if ref:
            out.append(Candidate("color", f"what color is the {ref}?", obj.color, tuple(COLORS)))
    return out


def _shape_questions(scene: Scene) -> list[Candidate]:
    out = []
    for obj in scene.objects:
        ref = _unique_reference(obj, scene, _NO_SHAPE_REF)
        if ref:
            out.append(Candidate("shape", f"what shape is the {ref}?", obj.shape, SHAPES))
    return out


def _count_questions(scene: Scene) -> list[Candidate]:
    objs = scene.objects
    out = [Candidate("count", "how many objects are there?", str(len(objs)), COUNT_ANSWERS)]
    for shape in SHAPES:
        n = sum(1 for o in objs if o.shape == shape)
        out.append(Candidate("count", f"how many {shape}s are there?", str(n), COUNT_ANSWERS))
    for color in COLORS:
        n = sum(1 for o in objs if o.color == color)
        out.append(Candidate("count", f"how many {color} objects are there?", str(n), COUNT_ANSWERS))
    for size in SIZES:
        n = sum(1 for o in objs if o.size == size)
        out.append(Candidate("count", f"how many {size} objects are there?", str(n), COUNT_ANSWERS))
    return out


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _exists_questions(scene: Scene) -> list[Candidate]:
    present = {(o.color, o.shape) for o in scene.objects}
    return [
        Candidate("exists", f"is there {_article(color)} {color} {shape}?", "yes" if (color, shape) in present else "no",
                  YES_NO)
        for color in COLORS
        for shape in SHAPES
    ]


def _relation_questions(scene: Scene) -> list[Candidate]:
    refs = [(o, _unique_reference(o, scene, _ANY_REF)) for o in scene.objects]
    named = [(o, r) for o, r in refs if r]
    out = []
    for a, ref_a in named:
        for b, ref_b in named:
            if a is b:
                continue
            if a.col != b.col:
                left = "yes" if a.col < b.col else "no"
                out.append(Candidate("relation", f"is the {ref_a} left of the {ref_b}?", left, YES_NO))
            if a.row != b.row:
                above = "yes" if a.row < b.row else "no"
                out.append(Candidate("relation", f"is the {ref_a} above the {ref_b}?", above, YES_NO))
            where = None
            if a.row == b.row:
                where = "left" if a.col < b.col else "right"
            elif a.col == b.col:
                where = "above" if a.row < b.row else "below"
            if where:
                question = f"where is the {ref_a} relative to the {ref_b}?"
                out.append(Candidate("relation", question, where, DIRECTIONS))
    return out


def scene_questions(scene: Scene) -> list[Candidate]:
    """Every question with an unambiguous answer about `scene`, in a fixed order."""
    return [
        *_color_questions(scene),
        *_shape_questions(scene),
        *_count_questions(scene),
        *_exists_questions(scene),
        *_relation_questions(scene),
    ]


class AnswerBalancer:
    """Picks questions so the ground-truth answers of a split stay close to uniform.

    For each pick it takes, among the answers the scene can support, the one used least so far
    (ties broken at random), then a random question with that answer.
    """

    def __init__(self) -> None:
        self.counts: dict[str, int] = {a: 0 for a in ALL_ANSWERS}

    def pick(self, rng: np.random.Generator, candidates: list[Candidate], k: int) -> list[Candidate]:
        """Choose up to `k` distinct questions for one scene."""
        pool = list(candidates)
        chosen: list[Candidate] = []
        while pool and len(chosen) < k:
            available = [a for a in ALL_ANSWERS if any(c.answer == a for c in pool)]
            low = min(self.counts[a] for a in available)
            tied = [a for a in available if self.counts[a] == low]
            answer = tied[int(rng.integers(len(tied)))]
            options = [c for c in pool if c.answer == answer]
            pick = options[int(rng.integers(len(options)))]
            chosen.append(pick)
            self.counts[answer] += 1
            pool = [c for c in pool if c.question != pick.question]
        return chosen

    def max_share(self) -> float:
        """Largest share of any single answer so far."""
        total = sum(self.counts.values())
        return max(self.counts.values()) / total if total else 0.0


def annotator_answers(rng: np.random.Generator, candidate: Candidate) -> list[str]:
    """Ten simulated annotator answers: the true one, with a few seeded confusions among `choices`."""
    answers = [candidate.answer] * NUM_ANNOTATORS
    noisy = min(int(rng.binomial(NUM_ANNOTATORS, NOISE_RATE)), MAX_NOISY_ANNOTATORS)
    wrong = [c for c in candidate.choices if c != candidate.answer]
    if noisy and wrong:
        for slot in rng.choice(NUM_ANNOTATORS, size=noisy, replace=False):
            answers[int(slot)] = wrong[int(rng.integers(len(wrong)))]
    return answers
