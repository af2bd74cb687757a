"""A seeded request's tokens do not depend on what else is in the batch (issue 13, item 2):
every target kind (plain, top-k, top-p, both, with biases) beside every neighbour kind
(greedy, plain, top-k, top-p, logit biases, banned tokens, probes, valves, latent rows),
in sample() itself and through the engine."""
from __future__ import annotations

import pytest
import torch

import cotrt
from cotrt.engine.sampler import sample

from cotrt.testing import tiny_model

TARGETS = {
    "plain": dict(temperature=0.8),
    "top_k": dict(temperature=0.8, top_k=20),
    "top_p": dict(temperature=0.8, top_p=0.7),
    "top_k_p": dict(temperature=1.2, top_k=50, top_p=0.9),
    "top_p_bias": dict(temperature=0.8, top_p=0.8, logit_bias={7: 5.0, 9: -100.0}),
}


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_sample_row_ignores_every_neighbour_kind(target):
    """sample() alone vs beside rows of each kind: the target row's draws are equal."""
    g = torch.Generator().manual_seed(13)
    V, n = 1000, 24
    kinds = {"greedy": (0.0, 1.0, 0), "plain": (1.0, 1.0, 0), "top_k": (0.7, 1.0, 5),
             "top_p": (1.0, 0.5, 0), "top_k_p": (0.9, 0.8, 3), "top_k_past_vocab": (1.0, 1.0, 5000)}
    t = TARGETS[target]
    for counter in range(n):
        logits = torch.randn(1, V, generator=g) * 3
        args = (torch.tensor([t["temperature"]]), torch.tensor([t.get("top_p", 1.0)]),
                torch.tensor([t.get("top_k", 0)]), torch.tensor([7]), torch.tensor([counter]))
        alone = sample(logits, *args).item()
        for name, (temp, p, k) in kinds.items():
            L = torch.cat([torch.randn(2, V, generator=g) * 3, logits])
            both = sample(L, torch.tensor([temp, temp, args[0].item()]), torch.tensor([p, p, args[1].item()]),
                          torch.tensor([k, k, args[2].item()]), torch.tensor([1, 2, 7]),
                          torch.tensor([counter, counter, counter]))
            assert both[2].item() == alone, (target, name, counter)


@pytest.fixture(scope="module")
def rt(smol_tokenizer, tmp_path_factory):
    pytest.importorskip("peft")
    from _peft import make_adapter

    model = tiny_model("llama", len(smol_tokenizer), seed=31)
    path = tmp_path_factory.mktemp("valve") / "short"
    make_adapter(model, path, seed=1, std=0.5, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    rt = cotrt.wrap(model, smol_tokenizer, max_batch=4, max_len=96)
    rt.load_valve(str(path), name="short")
    return rt


NEIGHBOURS = {
    "greedy": dict(),
    "plain": dict(temperature=1.0, seed=3),
    "top_k": dict(temperature=0.7, top_k=4, seed=4),
    "top_p": dict(temperature=1.0, top_p=0.5, seed=5),
    "bias": dict(temperature=0.9, logit_bias={11: 8.0}, seed=6),
    "banned": dict(temperature=0.9, seed=8, exit={"name": "nowait", "words": ["the", "a"]}),
    "probe": dict(temperature=0.9, seed=9, exit={"name": "dynasor", "every": 3, "max_tokens": 4}),
    "valve": dict(temperature=0.9, seed=10, valve={"short": 0.8}),
    "latent": dict(latent={"steps": 3, "begin_token": None, "end_token": None, "latent_token": None}),
}


def test_engine_request_ignores_every_neighbour_kind(rt):
    """Through the engine (eager step): each target alone, then beside two neighbours of
    each kind, admitted with it and one step later. Same tokens every time."""
    prompt = [5, 17, 300, 4000, 12]
    others = [[9, 8, 7, 6], [100, 200, 300, 400, 500, 600]]
    for tname in ("plain", "top_k", "top_p_bias"):
        t = TARGETS[tname]
        target = cotrt.Params(max_new_tokens=10, ignore_eos=True, seed=7, **t)
        alone = rt.generate([prompt], target)[0].token_ids
        for nname, n in NEIGHBOURS.items():
            eng = rt.engine
            rid = eng.add(prompt, target)
            eng.add(others[0], cotrt.Params(max_new_tokens=12, ignore_eos=True, **n))
            out, first = None, True
            while eng.has_unfinished():
                for ev in eng.step():
                    if ev.finished and ev.request_id == rid:
                        out = ev.output
                if first:
                    eng.add(others[1], cotrt.Params(max_new_tokens=8, ignore_eos=True, **n))
                    first = False
            assert out.finish_reason == "length", (tname, nname, out.error)
            assert out.token_ids == alone, (tname, nname)
