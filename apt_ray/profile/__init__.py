"""Cost profiles: FLOPs (measured and analytic) and parameter counts."""

from apt_ray.profile.flops import Profile, profile

__all__ = ["Profile", "profile"]
