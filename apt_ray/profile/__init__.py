"""Cost: FLOPs (measured and closed form) and parameter counts, and the measured cost of a training step."""

from apt_ray.profile.cost import Cost, Profile, closed_form_cost, model_limits, profile, trial_cost

__all__ = ["Cost", "Profile", "closed_form_cost", "model_limits", "profile", "trial_cost"]
