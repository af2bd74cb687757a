"""Latent (contemplation) rows against naive references that recompute the whole sequence
without a cache: Coconut's own algorithm, and CCoT's (layer-l feedback, END head, cap,
adapter switch)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import cotrt
from conftest import LATENT_TOKENS
from cotrt.testing import tiny_model



def _model(arch, tok, seed):
    m = tiny_model(arch, len(tok), seed=seed)
    return m


def _prompts(tok):
    return [tok.encode(t, add_special_tokens=False) for t in
            ["Q: 3+4*2 = ?", "Question: what is seven minus two?", "x=5, y=x+1; y?", "Hi"]]


@torch.no_grad()
def coconut_naive(model, prompt, k, begin_id, end_id, n_answer, layer=None, end_head=None, cap=None,
                  valves=None, switch=None):
    """Coconut's generate: embeddings of prompt+<begin>, then k times: run the whole
    sequence, append the last position's state as the next input embedding; then <end>
    and greedy answer tokens, each by a full recompute. With ``layer``: CCoT's layer-l
    residual instead of the final-norm state; with ``end_head``: stop when it fires (on the
    final-norm state), at most ``cap`` steps; with ``valves``/``switch``: positions before
    the switch run under adapter 0, the rest under adapter 1 (one alpha per position)."""
    emb = model.get_input_embeddings()
    x = emb(torch.tensor([prompt + [begin_id]]))
    fed = []

    def run(x):
        if valves is not None:
            T = x.shape[1]
            P = switch(len(fed)) if callable(switch) else T
            valves.state.alpha = torch.ones(T)
            valves.state.adapter = torch.tensor([0] * min(P, T) + [1] * max(0, T - P), dtype=torch.int32)
        out = model.model(inputs_embeds=x, output_hidden_states=layer is not None)
        if valves is not None:
            valves.state.clear()
        return out

    steps = k if k is not None else cap
    for i in range(steps):
        out = run(x)
        final = out.last_hidden_state[:, -1]
        if end_head is not None and end_head(final) > 0:
            break
        h = final if layer is None else out.hidden_states[layer + 1][:, -1]
        fed.append(h[0].clone())
        x = torch.cat([x, h[:, None].to(x.dtype)], 1)
    latent_end = x.shape[1]  # the end token and all after it: the answer adapter
    x = torch.cat([x, emb(torch.tensor([[end_id]]))], 1)
    toks = []
    for _ in range(n_answer):
        if valves is not None:
            T = x.shape[1]
            valves.state.alpha = torch.ones(T)
            valves.state.adapter = torch.tensor([0] * latent_end + [1] * (T - latent_end), dtype=torch.int32)
        h = model.model(inputs_embeds=x).last_hidden_state[:, -1]
        if valves is not None:
            valves.state.clear()
        t = int(model.get_output_embeddings()(h).argmax())
        toks.append(t)
        x = torch.cat([x, emb(torch.tensor([[t]]))], 1)
    return toks, fed


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_coconut_matches_naive_in_a_mixed_batch(arch, latent_tok):
    tok = latent_tok
    model = _model(arch, tok, seed=51)
    begin, end, lat = tok.convert_tokens_to_ids(LATENT_TOKENS)
    rt = cotrt.wrap(model, tok, max_batch=4, max_len=128)
    prompts = _prompts(tok)
    ks = [0, 1, 3, 6]
    n = 6
    # Latent rows at k in {0, 1, 3, 6} together with two plain token rows, 6 requests on 4 slots.
    # max_new_tokens counts answer tokens only (Coconut's rule): k latent steps + <end> + n.
    params = [cotrt.Params(max_new_tokens=n, ignore_eos=True, latent=cotrt.Latent(steps=k)) for k in ks]
    params += [cotrt.Params(max_new_tokens=9, ignore_eos=True)] * 2
    outs = rt.generate(prompts + prompts[:2], params)
    for p, k, o in zip(prompts, ks, outs):
        ref, fed = coconut_naive(model, p, k, begin, end, n)
        assert o.prompt_token_ids == p + [begin]
        assert o.token_ids[:k] == [lat] * k and o.token_ids[k] == end
        assert o.token_ids[k + 1:] == ref, (arch, k)
        assert o.stats["latent_steps"] == k and len(o.latent_states) == k
        for a, b in zip(o.latent_states, fed):
            torch.testing.assert_close(a, b.float(), rtol=1e-4, atol=1e-4)
    plain_alone = rt.generate(prompts[:2], cotrt.Params(max_new_tokens=9, ignore_eos=True))
    assert [o.token_ids for o in outs[4:]] == [o.token_ids for o in plain_alone]


class ScriptedHead(nn.Module):
    """An END head that fires on its n-th call (and a fixed input size, for binding)."""

    def __init__(self, hidden, n):
        super().__init__()
        self.lin = nn.Linear(hidden, 1)
        self.n, self.calls = n, 0

    def forward(self, x):
        if not bool(x.abs().sum() > 0):  # the shape check at bind time calls with zeros
            return torch.zeros(x.shape[0], 1)
        self.calls += 1
        fire = self.calls >= self.n
        return torch.full((x.shape[0], 1), 1.0 if fire else -1.0) + 0 * self.lin(x)


def _peft_valves(model, tmp_path):
    from _peft import make_adapter

    paths = []
    for i, name in enumerate(["contemplate", "answer"]):
        make_adapter(model, tmp_path / name, seed=10 + i, std=0.4, r=4, lora_alpha=8,
                     target_modules=["q_proj", "v_proj", "up_proj"])
        paths.append((name, str(tmp_path / name)))
    return paths


@pytest.mark.parametrize("fire_at,cap,layer", [(3, 6, 0), (9, 4, 0), (1, 6, 0), (3, 6, "final_norm")],
                         ids=["end-head", "cap", "end-head-at-once", "final-norm-feedback"])
def test_ccot_matches_naive(latent_tok, tmp_path, fire_at, cap, layer):
    """CCoT: the residual after layer 0 of 2 (l = L/2) fed back, or the final-norm state
    (as the latent testbed's CCoT does), under the contemplation valve; the END head decides."""
    pytest.importorskip("peft")
    tok = latent_tok
    base = _model("llama", tok, seed=61)
    begin, end, lat = tok.convert_tokens_to_ids(LATENT_TOKENS)
    model = copy.deepcopy(base)
    rt = cotrt.wrap(model, tok, max_batch=3, max_len=128)
    for name, path in _peft_valves(base, tmp_path):
        rt.load_valve(path, name=name)
    head = ScriptedHead(model.config.hidden_size, fire_at)
    spec = cotrt.Latent(end_head=head, max_steps=cap, feedback=layer,
                        valve_during={"contemplate": 1.0}, valve_after={"answer": 1.0})
    p = _prompts(tok)[0]
    n = 5
    # A latent row (with its valve switch), a plain row and a valve row, in one batch.
    out, plain, valved = rt.generate([p, _prompts(tok)[1], _prompts(tok)[2]], [
        cotrt.Params(max_new_tokens=cap + 1 + n, ignore_eos=True, latent=spec),
        cotrt.Params(max_new_tokens=7, ignore_eos=True),
        cotrt.Params(max_new_tokens=7, ignore_eos=True, valve={"answer": 0.7})])
    steps = min(fire_at - 1, cap)
    assert out.stats["latent_steps"] == steps
    ref_head = ScriptedHead(model.config.hidden_size, fire_at)
    ref, fed = coconut_naive(model, p, None, begin, end, n, layer=None if layer == "final_norm" else layer,
                             end_head=lambda s: ref_head(s)[0, 0],
                             cap=cap, valves=rt.valves)
    assert len(fed) == steps
    assert out.token_ids[:steps] == [lat] * steps and out.token_ids[steps] == end
    assert out.token_ids[steps + 1: steps + 1 + n] == ref
    for a, b in zip(out.latent_states, fed):
        torch.testing.assert_close(a, b.float(), rtol=1e-4, atol=1e-4)
    # The rows beside it got what they get alone.
    assert plain.token_ids == rt.generate([_prompts(tok)[1]], cotrt.Params(max_new_tokens=7, ignore_eos=True))[0].token_ids
    assert valved.token_ids == rt.generate([_prompts(tok)[2]], cotrt.Params(
        max_new_tokens=7, ignore_eos=True, valve={"answer": 0.7}))[0].token_ids


def test_ccot_end_head_on_the_prompt_without_end_token(latent_tok, tmp_path):
    """An END head that fires on the prompt's own forward, no end token (CCoT's default):
    as after a last thought, the first answer token comes from a forward under the latent
    phase's valve (the prompt's last token fed again, its KV slot rewritten under the same
    valve) and the answer valve runs from the next token on. Naive: the whole sequence
    recomputed, prompt positions on the contemplation adapter."""
    pytest.importorskip("peft")
    tok = latent_tok
    base = _model("llama", tok, seed=61)
    model = copy.deepcopy(base)
    rt = cotrt.wrap(model, tok, max_batch=3, max_len=128)
    for name, path in _peft_valves(base, tmp_path):
        rt.load_valve(path, name=name)
    spec = cotrt.Latent(end_head=ScriptedHead(model.config.hidden_size, 1), max_steps=6, feedback=0,
                        begin_token=None, end_token=None,
                        valve_during={"contemplate": 1.0}, valve_after={"answer": 1.0})
    p, other = _prompts(tok)[0], _prompts(tok)[1]
    n = 6
    out, plain = rt.generate([p, other], [cotrt.Params(max_new_tokens=n, ignore_eos=True, latent=spec),
                                          cotrt.Params(max_new_tokens=n, ignore_eos=True)])
    assert out.stats["latent_steps"] == 0
    ids, ref = list(p), []
    with torch.no_grad():
        for _ in range(n):
            T = len(ids)
            rt.valves.state.alpha = torch.ones(T)
            rt.valves.state.adapter = torch.tensor([0] * len(p) + [1] * (T - len(p)), dtype=torch.int32)
            h = model.model(inputs_embeds=model.get_input_embeddings()(torch.tensor([ids]))).last_hidden_state[:, -1]
            rt.valves.state.clear()
            ref.append(int(model.get_output_embeddings()(h).argmax()))
            ids.append(ref[-1])
    assert out.token_ids == ref
    assert plain.token_ids == rt.generate([other], cotrt.Params(max_new_tokens=n, ignore_eos=True))[0].token_ids


def test_bad_latent_specs(latent_tok, smol_tokenizer):
    model = _model("llama", latent_tok, seed=71)
    rt = cotrt.wrap(model, latent_tok, max_batch=2, max_len=64)
    with pytest.raises(ValueError, match="steps"):
        cotrt.Latent(steps=-1)
    with pytest.raises(ValueError, match="feedback"):
        rt.engine.add([5, 6], cotrt.Params(latent=cotrt.Latent(end_head=nn.Linear(64, 1), max_steps=3, feedback=7)))
    with pytest.raises(ValueError, match="projection"):
        rt.engine.add([5, 6], cotrt.Params(latent=cotrt.Latent(steps=2, projection=torch.zeros(64, 32))))
    with pytest.raises(ValueError, match="valve"):
        rt.engine.add([5, 6], cotrt.Params(latent=cotrt.Latent(steps=1, valve_during={"nope": 1.0})))
    assert not rt.engine.has_unfinished()
    plain_model = _model("llama", smol_tokenizer, seed=72)
    rt2 = cotrt.wrap(plain_model, smol_tokenizer, max_batch=1, max_len=64)
    with pytest.raises(ValueError, match="missing"):
        rt2.engine.add([5, 6], cotrt.Params(latent=cotrt.Latent(steps=2)))
    assert not rt2.engine.has_unfinished()
