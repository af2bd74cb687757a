"""cotrt: a runtime for compressed chain-of-thought decoding over Hugging Face causal LMs."""
from __future__ import annotations

__version__ = "0.1.0"

# Public names are imported lazily so that `import cotrt._C` or `cotrt.ops` stays light.
_LAZY = {
    "wrap": "cotrt.api",
    "Runtime": "cotrt.api",
    "Output": "cotrt.output",
    "Params": "cotrt.params",
    "ThinkFormat": "cotrt.control.think",
    "Engine": "cotrt.engine",
    "load_model": "cotrt.models",
    "AsyncEngine": "cotrt.async_engine",
    "Latent": "cotrt.latent",
    "QueueFull": "cotrt.async_engine",
    "Policy": "cotrt.control.policy",
    "Probe": "cotrt.control.policy",
    "Exit": "cotrt.control.policy",
    "Continue": "cotrt.control.policy",
    "SetValve": "cotrt.control.policy",
    "ProbeResult": "cotrt.control.policy",
    # the built-in policies (README "Early exit"), as cotrt.DEER(...) etc.
    "DEER": "cotrt.control.policies",
    "Dynasor": "cotrt.control.policies",
    "EAT": "cotrt.control.policies",
    "NoWait": "cotrt.control.policies",
    "StepLimit": "cotrt.control.policies",
    "ValveSchedule": "cotrt.control.policies",
    "SelfConsistency": "cotrt.control.consistency",
}

__all__ = sorted(_LAZY)


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


def __getattr__(name: str):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'cotrt' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value
