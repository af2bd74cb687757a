"""The latent testbed (hops task, Coconut and CCoT trained here), reduced: the task's
determinism, held-out exclusion and exact answers; --quick training deterministic from a
seed; reload and generation through cotrt with the Coconut and CCoT controls equal to a
naive loop that recomputes the whole sequence at every step."""
from __future__ import annotations

import random

import pytest
import torch

import cotrt
from cotrt.testbed import hops


def _follow(p: hops.HopProblem) -> str:
    for table in hops.OPS.values():  # each op is a permutation of the nodes
        assert sorted(table) == sorted(table.values()) == sorted(hops.NODES)
    x = p.start
    for o in p.ops:
        x = hops.OPS[o][x]
    return x


def test_problems_seeded_exact_and_held_out():
    test, val = hops.held_out(0), hops.validation(0)
    assert test == hops.held_out(0) and val == hops.validation(0)
    assert len(test) == hops.TEST_SIZE == 200 and len({p.question for p in test}) == 200
    assert not {p.question for p in test} & {p.question for p in val}
    assert hops.held_out(1, 20) != test[:20]
    for p in test + val:
        assert _follow(p) == p.answer == p.path[-1]
        assert hops.MIN_HOPS <= p.hops <= hops.MAX_HOPS and len(p.lines()) == p.hops
        assert hops.parse_answer(p.completion()) == p.answer
        assert hops.parse_answer(p.completion(cot=False)) == p.answer
    banned = hops.excluded(0)
    stream = hops.train_stream(0, exclude=banned)
    assert not any(next(stream).question in banned for _ in range(3000))
    # Without the exclusion the stream does draw test questions (so the filter is what keeps them out).
    s = hops.train_stream(0)
    assert any(next(s).question in banned for _ in range(3000))
    assert {p.hops for p in test} == set(range(hops.MIN_HOPS, hops.MAX_HOPS + 1))
    # Answers spread over the nodes (a permutation favours none).
    assert len({p.answer for p in test}) == len(hops.NODES)
    with pytest.raises(ValueError, match="hops"):
        hops.sample_problem(random.Random(0), hops=9)
    with pytest.raises(ValueError, match="n must be"):
        hops.held_out(0, 0)


def test_tokenizer_round_trips():
    tok = hops.build_tokenizer()
    hops.check_tokenizer(tok)
    p = hops.held_out(0, 1)[0]
    # Step i opens with the node hop i reaches (so a thought that replaces it, the state that
    # predicts its first token, points at that node); 6 tokens a step, the last 2.
    assert [len(tok.encode(t, add_special_tokens=False)) for t in p.lines()] == [6] * (p.hops - 1) + [2]
    assert [t[0] for t in p.lines()] == list(p.path[1:])
    for q in hops.held_out(0, 50):
        # Each op token names its hop (a content key) and its permutation.
        ops = q.question.split("ops ")[1]
        assert [hops.OP_TOKENS.index(o) // hops.NUM_OPS + 1 for o in ops.rstrip(".")] == list(range(1, q.hops + 1))
        assert [str(hops.OP_TOKENS.index(o) % hops.NUM_OPS + 1) for o in ops.rstrip(".")] == list(q.ops)
        assert tok.convert_ids_to_tokens(tok.encode(ops, add_special_tokens=False)) == list(ops)
    with pytest.raises(ValueError, match="op_token"):
        hops.op_token(hops.MAX_HOPS + 1, "1")
    # The ops sit at a fixed distance from the chain (padded to MAX_HOPS): one prompt length.
    assert len({len(tok.encode(q.prompt, add_special_tokens=False)) for q in hops.held_out(0, 50)}) == 1
    for t in (hops.THINK, hops.END, *hops.LATENT_TOKENS):
        assert len(tok.encode(t, add_special_tokens=False)) == 1
    assert hops.parse_answer("no answer") is None and hops.parse_answer("Answer: Z") is None


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    from cotrt.testbed import latent_train

    out = tmp_path_factory.mktemp("latent")
    log = latent_train.main(["--out", str(out), "--seed", "3", "--quick"])
    return out, log


def _state(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_quick_training_is_deterministic(quick, tmp_path):
    from cotrt.testbed import latent_train

    out, log = quick
    assert (out / "base" / "model.safetensors").is_file()
    assert sorted(p.name for p in (out / "coconut").iterdir()) == [f"stage_{s}.pt" for s in range(hops.MAX_HOPS + 1)]
    assert (out / "ccot" / "cotrt_bundle.json").is_file()
    stages = set(range(hops.MAX_HOPS + 1))
    assert log["base"]["cpu_seconds"] > 0 and set(log["coconut"]["cpu_seconds"]) == stages
    assert set(log["ccot"]["cpu_seconds"]) == stages and log["ccot"]["feedback"] == "final_norm"
    again = tmp_path / "again"
    latent_train.main(["--out", str(again), "--seed", "3", "--quick"])
    a, b = _state(out / "base" / "model.safetensors"), _state(again / "base" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for s in (1, hops.MAX_HOPS):
        a = torch.load(out / "coconut" / f"stage_{s}.pt", weights_only=True)
        b = torch.load(again / "coconut" / f"stage_{s}.pt", weights_only=True)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for f in ("valves/contemplate/adapter_model.safetensors", "valves/answer/adapter_model.safetensors",
              "end_head.safetensors"):
        a, b = _state(out / "ccot" / f), _state(again / "ccot" / f)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
    # A different seed trains different weights (the test above could not pass by accident).
    other = tmp_path / "other"
    latent_train.main(["--out", str(other), "--seed", "4", "--quick", "--only", "base"])
    a, b = _state(out / "base" / "model.safetensors"), _state(other / "base" / "model.safetensors")
    assert not all(torch.equal(a[k], b[k]) for k in a)


@torch.no_grad()
def _naive(model, prompt_ids, *, end_id, n_answer, steps=None, layer=None, end_head=None, cap=None,
           valves=None):
    """Recompute the whole sequence at every step (no cache): a latent step appends the state
    at the last position (the final-norm state, or the residual after decoder ``layer``) as
    the next input embedding; ``end_head`` (on the final-norm state) stops the phase, at most
    ``cap`` steps; then ``end_id`` and greedy tokens. With ``valves``: the prompt and latent
    positions run under adapter "contemplate", ``end_id`` and after under "answer" (alpha 1),
    as the runtime's valve_during / valve_after put them. ``end_id`` None: no end token (the
    last thought's forward gives the first answer token). Returns (answer tokens, fed states)."""
    emb = model.get_input_embeddings()
    x = emb(torch.tensor([prompt_ids]))
    fed = []

    def run(x, latent_end):
        if valves is not None:
            T = x.shape[1]
            valves.state.alpha = torch.ones(T)
            valves.state.adapter = torch.tensor([valves.index("contemplate")] * min(latent_end, T)
                                                + [valves.index("answer")] * max(0, T - latent_end), dtype=torch.int32)
        try:
            return model.model(inputs_embeds=x, output_hidden_states=True)
        finally:
            if valves is not None:
                valves.state.clear()

    for _ in range(steps if steps is not None else cap):
        out = run(x, x.shape[1])
        final = out.last_hidden_state[:, -1]
        if end_head is not None and float(end_head(final).reshape(-1)[0]) > 0:
            break
        h = final if layer is None else out.hidden_states[layer + 1][:, -1]
        fed.append(h[0].clone())
        x = torch.cat([x, h[:, None]], 1)
    latent_end = x.shape[1]
    if end_id is not None:  # without one, the last thought's forward gives the first token
        x = torch.cat([x, emb(torch.tensor([[end_id]]))], 1)
    toks = []
    for _ in range(n_answer):
        h = run(x, latent_end).last_hidden_state[:, -1]
        t = int(model.get_output_embeddings()(h).argmax())
        toks.append(t)
        x = torch.cat([x, emb(torch.tensor([[t]]))], 1)
    return toks, fed


def test_coconut_through_cotrt_matches_naive(quick):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cotrt.loaders import load_coconut
    from cotrt.testbed.latent_train import coconut_latent, stage_thoughts

    out, _ = quick
    stage = hops.MAX_HOPS
    model = AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(out / "base")
    model, tok, _ = load_coconut(model, tok, str(out / "coconut" / f"stage_{stage}.pt"), steps=0)
    rt = cotrt.wrap(model, tok, max_batch=4)
    probs = hops.validation(3, 4)
    ks = [stage_thoughts(stage, p.hops, 1) for p in probs]
    n = 4
    outs = rt.generate([p.prompt for p in probs],
                       [cotrt.Params(max_new_tokens=n, ignore_eos=True, latent=coconut_latent(k)) for k in ks])
    lat = tok.convert_tokens_to_ids(hops.LATENT_TOKENS[2])
    for p, k, o in zip(probs, ks, outs):
        ids = tok.encode(p.prompt, add_special_tokens=False)
        assert o.prompt_token_ids == ids  # no begin token
        assert o.token_ids[:k] == [lat] * k  # and no end token
        ref, fed = _naive(model, ids, steps=k, end_id=None, n_answer=n)
        assert o.stats["latent_steps"] == k == len(fed)
        assert o.token_ids[k:] == ref
        for a, b in zip(o.latent_states, fed):
            torch.testing.assert_close(a, b.float(), rtol=1e-4, atol=1e-4)


def test_ccot_bundle_through_cotrt_matches_naive(quick):
    from cotrt.loaders import load_ccot_bundle

    out, _ = quick
    model, tok, latent = load_ccot_bundle(out / "ccot")
    assert latent.feedback == "final_norm" and latent.max_steps == 2 * hops.MAX_HOPS
    rt = cotrt.wrap(model, tok, max_batch=4)
    probs = hops.validation(3, 3)
    n = 4
    outs = rt.generate([p.prompt for p in probs], cotrt.Params(max_new_tokens=n, ignore_eos=True, latent=latent))
    end_id = tok.convert_tokens_to_ids(hops.END)
    for p, o in zip(probs, outs):
        ids = tok.encode(p.prompt, add_special_tokens=False)
        ref, fed = _naive(model, ids, layer=None, end_head=latent.end_head, cap=latent.max_steps,
                          end_id=end_id, n_answer=n, valves=rt.valves)
        steps = len(fed)
        assert o.stats["latent_steps"] == steps
        assert o.token_ids[steps] == end_id
        assert o.token_ids[steps + 1:] == ref
        for a, b in zip(o.latent_states, fed):
            torch.testing.assert_close(a, b.float(), rtol=1e-4, atol=1e-4)


def test_ccot_feedback_setting():
    from cotrt.testbed.latent_train import _feedback

    assert _feedback("final_norm", 4) == "final_norm"
    assert _feedback("2", 4) == 2 and _feedback("-1", 4) == 3
    with pytest.raises(ValueError, match="out of range"):
        _feedback("4", 4)
    with pytest.raises(ValueError, match="feedback must be"):
        _feedback("last", 4)


def test_ccot_curriculum_suffix(quick):
    """What the answer LoRA reads after k contemplation steps: the chain steps left (their
    first token the node the last step predicts), then </think> and the answer; with every
    hop contemplated it opens with </think> itself (forced by the runtime, not a target)."""
    from transformers import AutoTokenizer

    from cotrt.testbed.latent_train import ccot_suffix

    out, _ = quick
    tok = AutoTokenizer.from_pretrained(out / "base")
    end_id = tok.convert_tokens_to_ids(hops.END)
    p = next(q for q in hops.validation(3, 20) if q.hops == 4)
    for k in range(p.hops + 1):
        ids = ccot_suffix(tok, p, k, end_id)
        assert ids[-1] == tok.eos_token_id and ids.count(end_id) == 1
        if k < p.hops:
            assert tok.convert_ids_to_tokens(ids[0]) == p.path[k + 1], (k, tok.decode(ids))
        else:
            assert ids[0] == end_id
        assert tok.decode(ids[ids.index(end_id) + 1:-1]).strip() == f"Answer: {p.answer}"
