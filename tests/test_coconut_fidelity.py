"""cotrt's Coconut rows against Coconut's own ``generate`` (facebookresearch/coconut,
coconut.py), restated naively below: prompts in Coconut's layout, what max_new_tokens
counts, an EOS as the first answer token, and layer feedback on GPT-2 (``transformer.h``)."""
from __future__ import annotations


import pytest
import torch
from torch import nn

import cotrt
from cotrt.control.think import ThinkFormat
from cotrt.latent import decoder_layers
from conftest import LATENT_TOKENS
from cotrt.testing import tiny_model



def tiny_gpt2(vocab_size: int, seed: int):
    """Coconut's own base family: a 2-layer GPT-2 (blocks under ``transformer.h``)."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)  # no greedy ties (see cotrt.testing.tiny_model)
    return model.eval()


def _model(arch, tok, seed):
    return tiny_gpt2(len(tok), seed) if arch == "gpt2" else tiny_model(arch, len(tok), seed=seed)


@torch.no_grad()
def coconut_generate(model, ids, latent_id, eos_id, max_new_tokens, layer=None):
    """Coconut.generate, step by step, without a cache.

    1. Embed the prompt (question, <start>, k x <latent>, <end>).
    2. Left to right, each <latent> position's input becomes the state of the position
       before it: the last entry of ``hidden_states`` (the final-norm output) or, with
       ``layer``, the residual after that decoder layer (CCoT's feedback).
    3. One pass over the whole sequence: the first answer token is its argmax, appended
       whatever it is (Coconut checks EOS only from the second token on).
    4. Up to max_new_tokens - 1 more greedy tokens, stopping before an EOS.
    Returns (answer tokens, fed-back states)."""
    emb = model.get_input_embeddings()
    x = emb(torch.tensor([ids]))
    fed = []
    for pos in [i for i, t in enumerate(ids) if t == latent_id]:
        out = model(inputs_embeds=x[:, :pos], output_hidden_states=True)
        h = out.hidden_states[-1 if layer is None else layer + 1][0, -1]
        fed.append(h.clone())
        x = x.clone()
        x[0, pos] = h
    tok = int(model(inputs_embeds=x).logits[0, -1].argmax())
    answer = [tok]
    for _ in range(max_new_tokens - 1):
        x = torch.cat([x, emb(torch.tensor([[tok]]))], 1)
        tok = int(model(inputs_embeds=x).logits[0, -1].argmax())
        if tok == eos_id:
            break
        answer.append(tok)
    return answer, fed


def _questions(tok):
    return [tok.encode(t, add_special_tokens=False) for t in
            ["Q: 3+4*2 = ?", "Question: what is seven minus two?", "x=5, y=x+1; y?"]]


def _ids(tok):
    return tok.convert_tokens_to_ids(LATENT_TOKENS)


def _strip_eos(tokens, eos):
    return tokens[:-1] if tokens and tokens[-1] == eos else tokens


# ---------------------------------------------------------------- item 10: Coconut's layout


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_prompt_in_coconut_layout_matches_coconut_generate(arch, latent_tok):
    tok = latent_tok
    model = _model(arch, tok, seed=81)
    begin, end, lat = _ids(tok)
    rt = cotrt.wrap(model, tok, max_batch=3, max_len=128)
    ks, n = [0, 2, 5], 8
    # Coconut's eval gives each question its own k: the prompt's, not the spec's steps=3.
    prompts = [q + [begin] + [lat] * k + [end] for q, k in zip(_questions(tok), ks)]
    outs = rt.generate(prompts, cotrt.Params(max_new_tokens=n, latent=cotrt.Latent(steps=3)))
    for q, k, p, o in zip(_questions(tok), ks, prompts, outs):
        ref, fed = coconut_generate(model, p, lat, eos_id=2, max_new_tokens=n)
        assert o.prompt_token_ids == q + [begin], (arch, k)
        assert o.token_ids[:k + 1] == [lat] * k + [end], (arch, k)
        assert _strip_eos(o.token_ids[k + 1:], 2) == ref, (arch, k)
        assert o.stats["latent_steps"] == k and len(o.latent_states) == k
        for a, b in zip(o.latent_states, fed):
            torch.testing.assert_close(a, b.float(), rtol=1e-4, atol=1e-4)
    # The same as the question alone with Latent(steps=k).
    for q, k, o in zip(_questions(tok), ks, outs):
        alone = rt.generate([q], cotrt.Params(max_new_tokens=n, latent=cotrt.Latent(steps=k)))[0]
        assert alone.token_ids == o.token_ids


def test_latent_placeholders_outside_the_layout_are_refused(latent_tok):
    tok = latent_tok
    rt = cotrt.wrap(_model("llama", tok, seed=82), tok, max_batch=2, max_len=64)
    begin, end, lat = _ids(tok)
    q = _questions(tok)[0]
    spec = cotrt.Latent(steps=2)
    bad = {
        "mid-prompt": q[:2] + [lat] + q[2:],
        "no end": q + [begin, lat, lat],
        "no begin": q + [lat, lat, end],
        "extra placeholder before": [lat] + q + [begin, lat, end],
    }
    for why, p in bad.items():
        with pytest.raises(ValueError, match="prompt: holds latent placeholder"):
            rt.engine.add(p, cotrt.Params(latent=spec))
    head = cotrt.Latent(end_head=nn.Linear(64, 1), max_steps=4)
    with pytest.raises(ValueError, match="prompt: is in Coconut's layout"):
        rt.engine.add(q + [begin, lat, end], cotrt.Params(latent=head))
    assert not rt.engine.has_unfinished()
    # The engine still serves.
    assert rt.generate([q], cotrt.Params(max_new_tokens=3, latent=spec))[0].stats["latent_steps"] == 2


# ------------------------------------------------------- item 11: what max_new_tokens counts


def test_max_new_tokens_counts_answer_tokens_only(latent_tok):
    """Coconut's max_new_tokens=N yields N answer tokens, whatever k: so does cotrt's (the k
    latent steps and the forced end-latent token are not counted)."""
    tok = latent_tok
    model = _model("llama", tok, seed=83)
    begin, end, lat = _ids(tok)
    rt = cotrt.wrap(model, tok, max_batch=2, max_len=128)
    q, k, n = _questions(tok)[1], 6, 16
    o = rt.generate([q], cotrt.Params(max_new_tokens=n, ignore_eos=True, latent=cotrt.Latent(steps=k)))[0]
    ref, _ = coconut_generate(model, q + [begin] + [lat] * k + [end], lat, eos_id=None, max_new_tokens=n)
    assert len(ref) == n
    assert len(o.token_ids) == k + 1 + n
    assert o.token_ids[k + 1:] == ref
    assert o.stats["new_tokens"] == n and o.stats["latent_steps"] == k
    assert o.finish_reason == "length" and o.stats["exit_reason"] == "max_new_tokens"


def test_answer_tokens_leave_the_latent_phase_out(latent_tok):
    """With think markers and a latent phase outside thinking, the tokens after the
    end-latent token are the answer (what answer_budget counts); the end-latent token is
    part of the latent phase (it was counted as an answer token), and latent steps are not
    forced tokens (those count what controls forced into the text: cues, markers, waits)."""
    tok = latent_tok
    model = _model("llama", tok, seed=84)
    rt = cotrt.wrap(model, tok, max_batch=1, max_len=128, think_format=ThinkFormat("<think>", "</think>"))
    q, k, n = _questions(tok)[0], 3, 5
    o = rt.generate([q], cotrt.Params(max_new_tokens=n, ignore_eos=True, latent=cotrt.Latent(steps=k)))[0]
    assert len(o.token_ids) == k + 1 + n
    assert o.stats["answer_tokens"] == n and o.stats["new_tokens"] == n and o.stats["think_tokens"] == 0
    assert o.stats["latent_steps"] == k and o.stats["forced_tokens"] == 0


# ------------------------------------------------- item 12: an EOS as the first answer token


def test_eos_as_first_answer_token_ends_the_request(latent_tok):
    """cotrt's choice, documented in the README: an EOS ends a request wherever it comes,
    the first answer token included. Coconut's generate appends a first-position EOS and
    goes on (it checks EOS from the second token on); that difference is pinned here."""
    tok = latent_tok
    model = _model("llama", tok, seed=85)
    begin, end, lat = _ids(tok)
    q, k, n = _questions(tok)[2], 2, 8
    probe = cotrt.wrap(model, tok, max_batch=1, max_len=128)
    first = probe.generate([q], cotrt.Params(max_new_tokens=1, ignore_eos=True,
                                             latent=cotrt.Latent(steps=k)))[0].token_ids[-1]
    model.generation_config.eos_token_id = first  # that token is now the EOS
    rt = cotrt.wrap(model, tok, max_batch=1, max_len=128)
    o = rt.generate([q], cotrt.Params(max_new_tokens=n, latent=cotrt.Latent(steps=k)))[0]
    assert o.token_ids == [lat] * k + [end, first]
    assert o.finish_reason == "stop" and o.stats["exit_reason"] == "eos"
    ref, _ = coconut_generate(model, q + [begin] + [lat] * k + [end], lat, eos_id=first, max_new_tokens=n)
    assert ref[0] == first and len(ref) > 1  # Coconut's generate would have gone on


# --------------------------------------------------- item 13: layer feedback beyond .layers


@pytest.mark.parametrize("arch,where", [("gpt2", "transformer.h"), ("llama", "model.layers")])
def test_decoder_layers_are_found_by_shape(arch, where, latent_tok):
    model = _model(arch, latent_tok, seed=86)
    assert decoder_layers(model) is model.get_submodule(where)


def test_feedback_layer_on_gpt2_matches_naive(latent_tok):
    tok = latent_tok
    model = _model("gpt2", tok, seed=87)
    begin, end, lat = _ids(tok)
    rt = cotrt.wrap(model, tok, max_batch=2, max_len=128)
    q, k, n, layer = _questions(tok)[0], 3, 6, 0
    spec = cotrt.Latent(steps=k, feedback=layer)
    o, plain = rt.generate([q, _questions(tok)[1]], [
        cotrt.Params(max_new_tokens=n, ignore_eos=True, latent=spec),
        cotrt.Params(max_new_tokens=n, ignore_eos=True)])
    ref, fed = coconut_generate(model, q + [begin] + [lat] * k + [end], lat, eos_id=None, max_new_tokens=n,
                                layer=layer)
    assert o.token_ids == [lat] * k + [end] + ref
    for a, b in zip(o.latent_states, fed):
        torch.testing.assert_close(a, b.float(), rtol=1e-4, atol=1e-4)
    assert plain.token_ids == rt.generate([_questions(tok)[1]], cotrt.Params(max_new_tokens=n,
                                                                              ignore_eos=True))[0].token_ids


def test_feedback_layer_without_a_layer_list_is_refused_at_bind(latent_tok):
    """A decoder whose layers are not an nn.ModuleList of num_hidden_layers: refused when
    the spec is bound (the request is never queued), not at the first step."""
    tok = latent_tok
    model = _model("llama", tok, seed=88)
    model.model.layers = nn.Sequential(*model.model.layers)  # still runs, but not a ModuleList
    rt = cotrt.wrap(model, tok, max_batch=1, max_len=64)
    with pytest.raises(ValueError, match="Latent.feedback: layer 1: no list of 2 decoder layers"):
        rt.engine.add(_questions(tok)[0], cotrt.Params(latent=cotrt.Latent(steps=2, feedback=1)))
    assert not rt.engine.has_unfinished()
    assert rt.generate([_questions(tok)[0]], cotrt.Params(max_new_tokens=3, latent=cotrt.Latent(steps=2)))[0] \
        .stats["latent_steps"] == 2
