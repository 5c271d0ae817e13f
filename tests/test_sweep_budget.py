"""FLOPs budget: the closed-form cost on a weightless model equals the measured profile; the search refuses what is
over the budget before any trial and hands each trial its cost."""

from __future__ import annotations

import pytest

from apt_ray.profile import profile
from apt_ray.profile.cost import model_limits, trial_cost
from apt_ray.sweep.spec import StudySpec, cheapest_cost


@pytest.mark.parametrize("model,method", [("tiny-vilt", "apt"), ("tiny-meter", "apt"), ("tiny-vilt", "deep_prompt"), ("tiny-meter", "lora")])
def test_budget_cost_matches_the_measured_profile(model: str, method: str) -> None:
    cfg = StudySpec(model=model, method=method).train_config({"num_prompts": 12, "rank": 4, "depth": 2, "placement": "top"})
    ds = cfg.data_spec()
    measured = profile(model, cfg.method_spec(), ds.max_text_len, (ds.image_size, ds.image_size))
    cost = trial_cost(cfg)
    assert cost.additional_gmacs == pytest.approx(measured.additional_gmacs, rel=1e-9)
    assert cost.updated_params == measured.analytic_updated_params


def test_paper_shapes_are_cheap_to_cost() -> None:
    cfg = StudySpec(model="meter-clip16-roberta").train_config({"num_prompts": 200, "rank": 4})
    gmacs = trial_cost(cfg).additional_gmacs  # a weightless model: no 300M-parameter build on the driver
    assert gmacs == pytest.approx(profile_free_reference(), rel=1e-6)


def profile_free_reference() -> float:
    """APT on METER at p=200, r=4, 24 sites (docs/methods.md): per site 2*N_q*p*d + 2*p*d*r, d=768,
    N_q = 50 text or 577 image tokens, each stream with one self- and one cross-attention site per layer."""
    d, p, r = 768, 200, 4
    per_layer = sum(2 * (2 * n * p * d + 2 * p * d * r) for n in (50, 577))
    return 6 * per_layer / 1e9


class Rejections:
    def __init__(self) -> None:
        self.seen: list[tuple[int, dict, str]] = []
        self.costs: list[dict] = []

    def over_budget(self, number: int, config: dict, cost: dict, reason: str) -> None:
        self.seen.append((number, config, reason))
        self.costs.append(cost)


def test_search_refuses_a_cost_just_over_the_budget(tmp_path) -> None:
    """With the budget set to the cost of p=8 at depth 1, the enqueued p=8 trains (carrying its cost) and p=9, just
    over, is never proposed to Tune: it is recorded as over budget and the slot goes to the next proposal."""
    from apt_ray.sweep.search import COST_KEY, BudgetedOptunaSearch, optuna_storage

    space = {"num_prompts": {"type": "int", "low": 1, "high": 64}}
    base = StudySpec(fixed={"pretrained": False, "depth": 1}, search_space=space)
    limit = trial_cost(base.train_config({"num_prompts": 8})).additional_gmacs
    spec = base.model_copy(update={"max_additional_gmacs": limit, "initial_points": [{"num_prompts": 9}, {"num_prompts": 8}]})
    sink = Rejections()
    search = BudgetedOptunaSearch(spec, optuna_storage(f"sqlite:///{tmp_path}/o.db"), [sink])
    search.set_search_properties(None, None, {})
    first = search.suggest("a")
    assert first["num_prompts"] == 8 and first[COST_KEY]["additional_gmacs"] == pytest.approx(limit)
    assert first[COST_KEY]["updated_params"] == trial_cost(base.train_config({"num_prompts": 8})).updated_params
    assert len(sink.seen) == 1 and sink.seen[0][1]["num_prompts"] == 9 and "over the FLOPs budget" in sink.seen[0][2]
    over = sink.costs[0]["additional_gmacs"]
    assert over == pytest.approx(trial_cost(base.train_config({"num_prompts": 9})).additional_gmacs) and over > limit
    assert search.rejected == 1
    second = search.suggest("b")
    assert second[COST_KEY]["additional_gmacs"] <= limit  # whatever TPE proposes next is within the budget


def test_cheapest_cost_is_the_low_corner() -> None:
    spec = StudySpec()
    assert cheapest_cost(spec) == pytest.approx(trial_cost(spec.train_config({"num_prompts": 1, "rank": 1, "depth": 1})).additional_gmacs)


def test_model_limits() -> None:
    assert (model_limits("tiny-meter").num_layers, model_limits("tiny-meter").hidden_size) == (4, 64)
    assert (model_limits("vilt-b32").num_layers, model_limits("vilt-b32").hidden_size) == (12, 768)
    assert model_limits("meter-clip16-roberta").num_layers == 6


def test_search_knows_which_trials_it_never_heard_the_end_of(tmp_path) -> None:
    """What tells an interrupted sweep (SIGINT: Tune ends running trials as TERMINATED) from a finished one."""
    from apt_ray.sweep.run import _interrupted
    from apt_ray.sweep.search import BudgetedOptunaSearch, optuna_storage
    from apt_ray.sweep.spec import StudySpec

    spec = StudySpec(name="untold", num_trials=2, fixed={"pretrained": False})
    search = BudgetedOptunaSearch(spec, optuna_storage(f"sqlite:///{tmp_path}/o.db"))
    search.set_search_properties(None, None, {})
    assert search.suggest("a") and search.suggest("b")
    search.on_trial_complete("a", {"val_score": 50.0, "additional_gmacs": 0.01})

    class Grid:  # what Tune returns after Ctrl-C: both trials TERMINATED
        num_terminated, num_errors = 2, 0

        def __len__(self) -> int:
            return 2

    assert search.untold() == ["b"]
    assert _interrupted(Grid(), spec, search)
    search.on_trial_complete("b", {"val_score": 40.0, "additional_gmacs": 0.001})
    assert search.untold() == [] and not _interrupted(Grid(), spec, search)
