"""Every built-in policy checks all its settings in its constructor (issue 13, item 4): a
bad one raises ValueError naming the policy and the setting before anything is queued."""
from __future__ import annotations

import pytest

import cotrt
from cotrt.control.policies import build_policy

BAD = [
    ("dynasor", "max_tokens", "x"), ("dynasor", "max_tokens", -1), ("dynasor", "every", "x"),
    ("dynasor", "k", 0), ("dynasor", "inducer", 5), ("dynasor", "profile", 5),
    ("eat", "every", "x"), ("eat", "threshold", "x"), ("eat", "min_probes", "x"), ("eat", "end_text", 5),
    ("eat", "alpha", float("nan")), ("eat", "on_boundary", "yes"),
    ("nowait", "words", [1, 2]), ("nowait", "words", "Wait"), ("nowait", "profile", {}),
    ("valve_schedule", "start", "nan"), ("valve_schedule", "start", float("inf")), ("valve_schedule", "valve", 3),
    ("valve_schedule", "budget", "x"), ("valve_schedule", "every", 0), ("valve_schedule", "min_change", -1),
    ("deer", "profile", 5), ("deer", "profile", {}), ("deer", "profile", "nope"), ("deer", "max_tokens", -5),
    ("deer", "max_probes", "x"), ("deer", "threshold", "x"), ("deer", "cues", [None]), ("deer", "inducer", 1),
    ("deer", "require_end", "x"), ("steps", "max_steps", "x"), ("steps", "cues", [""]),
]


@pytest.mark.parametrize("name,setting,value", BAD)
def test_bad_setting_is_refused_in_the_constructor(name, setting, value):
    spec = {"name": name, setting: value}
    if name == "valve_schedule" and setting != "budget":
        spec.setdefault("budget", 10)
    if name == "valve_schedule" and setting != "valve":
        spec.setdefault("valve", "v")
    if name == "steps" and setting != "max_steps":
        spec["max_steps"] = 2
    with pytest.raises(ValueError, match=rf"^{name}: {setting}"):
        build_policy(spec)
    with pytest.raises(ValueError, match=rf"^{name}: {setting}"):
        cotrt.Params(exit=spec)


def test_good_settings_still_build():
    for spec in ({"name": "deer", "max_tokens": 8, "max_probes": 2, "cues": ["Wait"]},
                 {"name": "dynasor", "every": 8, "k": 2, "max_tokens": 4},
                 {"name": "eat", "every": 8, "threshold": 0.01, "min_probes": 2, "end_text": "</think>"},
                 {"name": "nowait", "words": ["Wait", "Hmm"]}, {"name": "steps", "max_steps": 3},
                 {"name": "valve_schedule", "valve": "v", "budget": 5, "start": 0, "end": 1.5}):
        assert build_policy(spec).name == spec["name"]


def test_schedule_of_an_unknown_valve_is_refused_at_add(smol_tokenizer):
    from cotrt.testing import tiny_model

    rt = cotrt.wrap(tiny_model("llama", len(smol_tokenizer), seed=2), smol_tokenizer, max_batch=1, max_len=32)
    with pytest.raises(ValueError, match=r"^exit: valve_schedule: valve: unknown valve 'nope'"):
        rt.engine.add([5, 6], cotrt.Params(exit={"name": "valve_schedule", "valve": "nope", "budget": 4}))
    assert not rt.engine.has_unfinished()
