"""The built-in methods' configs and registrations (light modules: pydantic only, no torch).

Each module declares one method's knobs and registers it with a lazy ``"module:function"`` path to its torch
implementation (``apt_ray.methods.<name>``), so that registering never imports torch. Order here is the order
of ``METHOD_NAMES``, the ``apt-ray profile`` flags and the knob fields.
"""

from apt_ray.methods.configs import apt, deep_prompt, kv_prompt, lora, adapter, probe  # noqa: F401  (registers)
