"""Valves against the real peft library on tiny random HF models (CPU, fp32).

A valve at alpha must equal PEFT's LoRA with its scaling multiplied by alpha: logits within
the fp32 tolerance and identical greedy tokens; per-row alphas and adapters in one batch
give each row what it gives alone; every loading error leaves the model unchanged.
"""
import copy
import json
import os
import shutil

import pytest
import torch
from torch import nn

if not torch.cuda.is_available():
    # peft/transformers import triton; Triton's interpreter must be chosen before that, or
    # tests/ops/test_valve_lora.py's interpreter tests would skip.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from _peft import make_adapter, set_peft_alpha
from cotrt.testing import assert_close
from cotrt.valve import ValveLinear, ValveSet, ValveState

peft = pytest.importorskip("peft")
from peft.tuners.lora import LoraLayer  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,  # noqa: E402
                          Qwen2Config, Qwen2ForCausalLM)

ALPHAS = [0.0, 0.5, 1.0, 1.7]
VOCAB = 128


def _tiny(kind: str):
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  hidden_size=64, intermediate_size=128, max_position_embeddings=128)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif kind == "qwen2":  # q/k/v carry biases: ValveLinear must share them
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128))
    return model.eval()


@pytest.fixture(scope="module")
def bases():
    return {k: _tiny(k) for k in ("llama", "qwen2", "gpt2")}


def prompts(n=4, seed=2, lengths=(5, 7, 3, 6)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (lengths[i % len(lengths)],), generator=g) for i in range(n)]


@torch.no_grad()
def logits(model, ids):
    return model(input_ids=ids).logits


@torch.no_grad()
def greedy(model, ids, n=6):
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                         do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1]:]


ADAPTERS = {
    "plain": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"]),
    "rslora": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "k_proj", "up_proj", "down_proj"]),
    "all-linear": dict(r=4, lora_alpha=4, target_modules="all-linear"),
    "regex+layers": dict(r=8, lora_alpha=16, target_modules=r".*\.1\.mlp\.(gate|up)_proj"),
    "layers_to_transform": dict(r=8, lora_alpha=8, target_modules=["q_proj", "gate_proj"], layers_to_transform=[1]),
}


@pytest.mark.parametrize("kind,variant", [("llama", "plain"), ("llama", "rslora"), ("qwen2", "plain"),
                                          ("qwen2", "all-linear"), ("llama", "regex+layers"),
                                          ("qwen2", "layers_to_transform")])
def test_valve_equals_peft_scaled(bases, tmp_path, kind, variant):
    base = bases[kind]
    pm = make_adapter(base, tmp_path, **ADAPTERS[variant])
    model = copy.deepcopy(base)
    vs = ValveSet(model)
    idx = vs.load(tmp_path, "v")
    assert idx == 0
    n_peft = sum(isinstance(m, LoraLayer) for m in pm.modules())
    assert len(vs.info["v"]["modules"]) == n_peft
    assert not isinstance(model.get_output_embeddings(), ValveLinear)
    for name in vs.info["v"]["modules"]:  # the very same Parameters, never copies
        vl = model.get_submodule(name)
        assert isinstance(vl, ValveLinear)
        assert vl.weight is dict(model.named_parameters())[name + ".weight"]
    ids = torch.stack([p[:5] for p in prompts(2)])
    seen = []
    for alpha in ALPHAS:
        set_peft_alpha(pm, alpha)
        vs.state.set_uniform(alpha, idx)
        want = logits(pm, ids)
        assert_close(logits(model, ids), want, msg=f"{kind}/{variant} alpha={alpha}")
        assert torch.equal(greedy(model, ids), greedy(pm, ids)), f"greedy tokens differ at alpha={alpha}"
        seen.append(want)
    assert (seen[-1] - seen[0]).abs().max() > 1e-2  # the valve does something
    vs.state.clear()  # no valve: exactly the base model
    assert torch.equal(logits(model, ids), logits(base, ids))


def test_gpt2_conv1d_fan_in_fan_out(bases, tmp_path):
    base = bases["gpt2"]
    pm = make_adapter(base, tmp_path, r=8, lora_alpha=16, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    model = copy.deepcopy(base)
    vs = ValveSet(model)
    vs.load(tmp_path, "v")
    ids = torch.stack([p[:5] for p in prompts(2)])
    for alpha in (0.5, 1.7):
        set_peft_alpha(pm, alpha)
        vs.state.set_uniform(alpha)
        assert_close(logits(model, ids), logits(pm, ids), msg=f"gpt2 alpha={alpha}")


def test_mixed_alpha_batch_rows_equal_alone(bases, tmp_path):
    base = bases["llama"]
    make_adapter(base, tmp_path, **ADAPTERS["plain"])
    model = copy.deepcopy(base)
    vs = ValveSet(model)
    idx = vs.load(tmp_path, "v")
    ps = prompts(4)
    S = max(len(p) for p in ps)
    ids = torch.zeros(4, S, dtype=torch.long)
    mask = torch.zeros(4, S, dtype=torch.long)
    for i, p in enumerate(ps):  # right padding: valid positions never see the pad
        ids[i, : len(p)], mask[i, : len(p)] = p, 1
    alphas = [0.0, 0.5, 1.0, 1.7]
    vs.state.set_rows(torch.tensor(alphas), torch.full((4,), idx, dtype=torch.int32), tokens_per_row=S)
    with torch.no_grad():
        batch = model(input_ids=ids, attention_mask=mask).logits
    for i, (p, a) in enumerate(zip(ps, alphas)):
        vs.state.set_uniform(a, idx)
        assert_close(batch[i, : len(p)], logits(model, p[None])[0], msg=f"row {i} alpha={a}")


def test_two_valves_per_row_adapter(bases, tmp_path):
    base = bases["qwen2"]
    pa = make_adapter(base, tmp_path / "a", seed=1, **ADAPTERS["plain"])
    pb = make_adapter(base, tmp_path / "b", seed=5, **ADAPTERS["rslora"])
    model = copy.deepcopy(base)
    vs = ValveSet(model)
    ia, ib = vs.load(tmp_path / "a", "short"), vs.load(tmp_path / "b", "long")
    assert (ia, ib) == (0, 1) and vs.index("long") == 1 and vs.names == ["short", "long"]
    ps = prompts(4, lengths=(5,))
    rows = [(ia, 1.0, pa), (ib, 0.5, pb), (ia, 1.7, pa), (-1, 1.0, base)]  # -1: base-only row
    vs.state.set_rows([a for _, a, _ in rows], [i for i, _, _ in rows], tokens_per_row=5)
    batch = logits(model, torch.stack(ps))
    for p, (i, a, want_model), got in zip(ps, rows, batch):
        if want_model is not base:
            set_peft_alpha(want_model, a)
        assert_close(got, logits(want_model, p[None])[0], msg=f"adapter {i} alpha={a}")


@pytest.mark.parametrize("prefix", ["base_model.model.", ""])
def test_plain_state_dict(bases, tmp_path, prefix):
    base = bases["llama"]
    pm = make_adapter(base, tmp_path, **ADAPTERS["plain"])
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    sd = {k.replace("base_model.model.", prefix): v for k, v in saved.items()}
    model = copy.deepcopy(base)
    vs = ValveSet(model)
    vs.load(sd, "sd", scale=16 / 8)
    ids = prompts(1)[0][None]
    set_peft_alpha(pm, 1.7)
    vs.state.set_uniform(1.7)
    assert_close(logits(model, ids), logits(pm, ids))


def test_bin_weights_and_unload(bases, tmp_path):
    base = bases["llama"]
    pm = make_adapter(base, tmp_path / "a", **ADAPTERS["plain"])
    pm.save_pretrained(str(tmp_path / "bin"), safe_serialization=False)
    assert (tmp_path / "bin" / "adapter_model.bin").is_file()
    make_adapter(base, tmp_path / "b", seed=3, **ADAPTERS["rslora"])
    model = copy.deepcopy(base)
    vs = ValveSet(model)
    vs.load(tmp_path / "bin", "a")
    vs.load(tmp_path / "b", "b")
    ids = prompts(1)[0][None]
    vs.state.set_uniform(1.0, vs.index("a"))
    want_a = logits(model, ids)
    vs.unload("b")  # modules only "b" used are plain linears again; "a" unaffected
    assert type(model.model.layers[0].mlp.up_proj) is nn.Linear
    assert_close(logits(model, ids), want_a)
    assert vs.load(tmp_path / "b", "b2") == 1
    vs.unload("a")
    assert vs.load(tmp_path / "bin", "a2") == 0  # freed index reused
    vs.unload("a2")
    vs.unload("b2")
    assert all(type(m) is not ValveLinear for m in model.modules())
    vs.state.clear()
    assert torch.equal(logits(model, ids), logits(base, ids))


# ------------------------------------------------------------------------------ errors


def snapshot(model, vs):
    return ({n: type(m) for n, m in model.named_modules()},
            {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]},
            list(vs.names))


def assert_same(snap, model, vs):
    types, tensors, names = snap
    assert {n: type(m) for n, m in model.named_modules()} == types
    now = dict([*model.named_parameters(), *model.named_buffers()])
    assert now.keys() == tensors.keys()
    for n, t in tensors.items():
        assert now[n].shape == t.shape and torch.equal(now[n], t), n
    assert vs.names == names


def _edit_config(path, **changes):
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path


def _sd(path):
    return dict(load_file(str(path / "adapter_model.safetensors")))


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"
V1 = "base_model.model.model.layers.1.self_attn.v_proj"

ERRORS = {
    "shape": (lambda p: ({**_sd(p), V1 + ".lora_A.weight": torch.randn(8, 65)}, 2.0),
              r"layers\.1\.self_attn\.v_proj.*\[N=32, K=64\].*lora_A \(8, 65\)"),
    "missing B": (lambda p: ({k: v for k, v in _sd(p).items() if k != V1 + ".lora_B.weight"}, 2.0),
                  "has lora_A but no lora_B"),
    "unknown module": (lambda p: ({**_sd(p), "model.layers.9.q_proj.lora_A.weight": torch.randn(8, 64),
                                   "model.layers.9.q_proj.lora_B.weight": torch.randn(64, 8)}, 2.0),
                       "unknown module 'model.layers.9.q_proj'"),
    "rank mismatch": (lambda p: ({**_sd(p), V1 + ".lora_B.weight": torch.randn(32, 4)}, 2.0), "rank mismatch"),
    "not linear": (lambda p: ({**_sd(p), "model.embed_tokens.lora_A.weight": torch.randn(8, 128),
                               "model.embed_tokens.lora_B.weight": torch.randn(64, 8)}, 2.0), "Embedding"),
    "non-finite": (lambda p: ({**_sd(p), V1 + ".lora_A.weight": torch.full((8, 64), float("nan"))}, 2.0),
                   "non-finite"),
    "no scale": (lambda p: (_sd(p), None), "needs scale="),
    "duplicate name": (lambda p: (p, None), "already loaded"),
    "modules_to_save": (lambda p: (_edit_config(p, modules_to_save=["lm_head"]), None), "modules_to_save"),
    "dora": (lambda p: (_edit_config(p, use_dora=True), None), "DoRA"),
    "bias": (lambda p: (_edit_config(p, bias="all"), None), "bias='all'"),
    "config rank": (lambda p: (_edit_config(p, r=4), None), "says r=4"),
    "target without weights": (lambda p: (_edit_config(p, target_modules=["q_proj", "v_proj", "o_proj", "k_proj"]),
                                          None), "no lora_A/lora_B"),
    "no weights file": (lambda p: ((p / "adapter_model.safetensors").unlink() or p, None), "neither"),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_errors_leave_model_unchanged(bases, tmp_path, case):
    base = bases["llama"]
    make_adapter(base, tmp_path / "first", seed=4, **ADAPTERS["rslora"])
    make_adapter(base, tmp_path / "bad", **ADAPTERS["plain"])
    model = copy.deepcopy(base)
    vs = ValveSet(model)
    vs.load(tmp_path / "first", "first")
    snap = snapshot(model, vs)
    source, scale = ERRORS[case][0](tmp_path / "bad")
    name = "first" if case == "duplicate name" else "bad"
    with pytest.raises(ValueError, match=ERRORS[case][1]):
        if isinstance(source, dict):
            vs.load(source, name, scale=scale)
        else:
            vs.load(source, name)
    assert_same(snap, model, vs)
    # and the set still loads a good adapter afterwards
    shutil.rmtree(tmp_path / "bad")
    make_adapter(base, tmp_path / "bad", **ADAPTERS["plain"])
    assert vs.load(tmp_path / "bad", "bad") == 1


def test_state_errors():
    st = ValveState()
    with pytest.raises(ValueError, match="tokens_per_row"):
        st.set_rows([1.0], None, tokens_per_row=0)
    with pytest.raises(ValueError, match="adapter has 1 rows, alpha has 2"):
        st.set_rows([1.0, 0.5], [0])
    with pytest.raises(ValueError, match="non-finite"):
        st.set_rows([float("nan")])
    with pytest.raises(ValueError, match="alpha must be a finite"):
        st.set_uniform(float("inf"))
    lin = nn.Linear(8, 4)
    vl = ValveLinear(lin, st)
    vl.set_adapter(0, torch.randn(2, 8), torch.randn(4, 2))
    st.set_rows([1.0, 0.5], tokens_per_row=3)
    vl(torch.randn(2, 3, 8))  # 6 token rows: fine
    with pytest.raises(ValueError, match="has 6 rows but this forward has 4"):
        vl(torch.randn(2, 2, 8))
    st.set_rows([1.0, 0.5], tokens_per_row=2)  # buffers reused in place
    assert st.alpha.tolist() == [1.0, 1.0, 0.5, 0.5]


def test_static_buffers_never_move():
    """Decode-sized forwards write alphas into the reserve_static buffer (a captured graph
    reads it); a long prefill grows the other buffer, never this one."""
    st = ValveState()
    st.reserve_static(8)
    st.set_rows([0.5, 1.0, 0.0], [0, 1, -1])
    ptr_a, ptr_i = st.alpha.data_ptr(), st.adapter.data_ptr()
    st.set_rows([1.0] * 4, [0] * 4, tokens_per_row=40)  # 160 rows: the growable buffer
    assert st.alpha.numel() == 160 and st.alpha.data_ptr() != ptr_a
    st.set_rows([0.25] * 8, [1] * 8)
    assert (st.alpha.data_ptr(), st.adapter.data_ptr()) == (ptr_a, ptr_i)
    assert st.alpha.tolist() == [0.25] * 8 and st.adapter.tolist() == [1] * 8
    st.reserve_static(4)  # smaller: nothing changes
    st.set_rows([2.0], [0])
    assert st.alpha.data_ptr() == ptr_a
