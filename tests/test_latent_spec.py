"""cotrt.latent: Latent validation at construction, Latent.bind against a tiny Llama and the
SmolLM2 tokenizer with the Coconut tokens added, and bind errors that leave model and
tokenizer exactly as they were."""
import copy
import math

import pytest
import torch
from torch import nn

from cotrt.testing import tiny_model
from cotrt.latent import BoundLatent, Latent

TOKENS = ["<|start-latent|>", "<|end-latent|>", "<|latent|>"]
H = 64  # tiny_model's hidden size
L = 2  # and its decoder layers


@pytest.fixture(scope="module")
def latent_tok(smol_tokenizer):
    tok = copy.deepcopy(smol_tokenizer)
    tok.add_tokens(TOKENS)
    return tok


@pytest.fixture(scope="module")
def model(latent_tok):
    return tiny_model("llama", len(latent_tok), seed=1)


def _snapshot(model, tok):
    return ({k: v.clone() for k, v in model.state_dict().items()}, repr(model), len(tok),
            dict(model.__dict__.get("_modules")), getattr(model, "cotrt_end_heads", None))


def _assert_unchanged(before, model, tok):
    sd, rep, n, mods, heads = before
    after = model.state_dict()
    assert sd.keys() == after.keys()
    assert all(torch.equal(sd[k], after[k]) for k in sd)
    assert repr(model) == rep and len(tok) == n and dict(model._modules) == mods
    assert getattr(model, "cotrt_end_heads", None) is heads


# ------------------------------------------------------------------------------ construction


def test_defaults_and_frozen():
    lat = Latent(steps=3)
    assert (lat.begin_token, lat.end_token, lat.latent_token) == tuple(TOKENS)
    assert lat.feedback == "final_norm" and lat.insert_begin and lat.max_steps is None
    with pytest.raises(AttributeError):
        lat.steps = 4
    ccot = Latent(end_head="h", max_steps=8, feedback=-1, valve_during={"contemplate": 1},
                  valve_after={"answer": 0.5})
    assert dict(ccot.valve_during) == {"contemplate": 1.0}
    with pytest.raises(TypeError):
        ccot.valve_after["answer"] = 2.0  # read-only: a frozen spec stays frozen
    assert Latent(steps=0).steps == 0


@pytest.mark.parametrize("kw,field,match", [
    (dict(steps=-1), "steps", ">= 0"),
    (dict(steps=1.5), "steps", "int >= 0"),
    (dict(steps=True), "steps", "int >= 0"),
    (dict(), "steps", "exactly one"),
    (dict(steps=2, end_head=nn.Linear(H, 1), max_steps=4), "steps", "exactly one"),
    (dict(end_head=nn.Linear(H, 1)), "max_steps", "required"),
    (dict(end_head=""), "end_head", "non-empty"),
    (dict(end_head=3, max_steps=4), "end_head", "nn.Module or a head name"),
    (dict(steps=2, max_steps=4), "max_steps", "exactly k steps"),
    (dict(end_head="h", max_steps=0), "max_steps", ">= 1"),
    (dict(end_head="h", max_steps=2.0), "max_steps", ">= 1"),
    (dict(steps=1, feedback="last"), "feedback", "'final_norm' or a decoder layer"),
    (dict(steps=1, feedback=1.0), "feedback", "'final_norm' or a decoder layer"),
    (dict(steps=1, feedback=True), "feedback", "'final_norm' or a decoder layer"),
    (dict(steps=1, projection=torch.zeros(H)), "projection", "2-D float"),
    (dict(steps=1, projection=torch.zeros(H, H, dtype=torch.long)), "projection", "2-D float"),
    (dict(steps=1, projection=nn.Sequential(nn.Linear(H, H))), "projection", "nn.Linear"),
    (dict(steps=1, begin_token=""), "begin_token", "token string"),
    (dict(steps=1, end_token=-1), "end_token", "token string"),
    (dict(steps=1, latent_token=2.0), "latent_token", "token string"),
    (dict(steps=1, insert_begin=1), "insert_begin", "bool"),
    (dict(steps=1, valve_during=[("a", 1.0)]), "valve_during", "dict"),
    (dict(steps=1, valve_during={"": 1.0}), "valve_during", "non-empty"),
    (dict(steps=1, valve_after={"a": math.nan}), "valve_after", "finite"),
    (dict(steps=1, valve_after={"a": "1"}), "valve_after", "finite"),
])
def test_construction_errors_name_the_field(kw, field, match):
    with pytest.raises(ValueError, match=f"Latent.{field}: .*{match}"):
        Latent(**kw)


def test_from_dict():
    lat = Latent.from_dict({"end_head": "ccot", "max_steps": 6, "feedback": 1, "begin_token": None,
                            "valve_during": {"contemplate": 1.0}})
    assert lat.end_head == "ccot" and lat.begin_token is None and lat.feedback == 1
    with pytest.raises(ValueError, match="unknown or non-JSON field.*stepz"):
        Latent.from_dict({"stepz": 3})
    with pytest.raises(ValueError, match="projection"):
        Latent.from_dict({"steps": 3, "projection": [[1.0]]})
    with pytest.raises(ValueError, match="must be a dict"):
        Latent.from_dict([("steps", 3)])


# ------------------------------------------------------------------------------ bind


def test_bind_coconut(model, latent_tok):
    b = Latent(steps=3).bind(model, latent_tok)
    assert isinstance(b, BoundLatent)
    want = latent_tok.convert_tokens_to_ids(TOKENS)
    assert [b.begin_id, b.end_id, b.latent_id] == want and len(set(want)) == 3
    assert (b.steps, b.max_steps, b.layer, b.num_layers, b.hidden_size, b.embed_size) == (3, 3, None, L, H, H)
    assert b.end_head is None and b.proj_weight is None and b.norm_weight is None
    assert b.norm_eps == model.config.rms_norm_eps
    assert b.contemplate_kwargs() == dict(norm_weight=None, norm_eps=b.norm_eps, proj_weight=None, proj_bias=None)
    assert b.prepare_prompt([5, 6]) == [5, 6, want[0]]
    assert b.prepare_prompt([5, want[0]]) == [5, want[0]]
    assert b.prepare_prompt([]) == [want[0]]
    nob = Latent(steps=1, insert_begin=False, begin_token=want[0], end_token=None, latent_token=None)
    b2 = nob.bind(model, latent_tok)
    assert b2.prepare_prompt([5]) == [5] and b2.end_id is None and b2.begin_id == want[0]


@pytest.mark.parametrize("feedback,layer", [("final_norm", None), (0, 0), (1, 1), (-1, 1), (-2, 0)])
def test_bind_feedback_layers(model, latent_tok, feedback, layer):
    assert Latent(steps=1, feedback=feedback).bind(model, latent_tok).layer == layer


@pytest.mark.parametrize("n_out", [1, 2])
def test_bind_end_head_linear_decides(model, latent_tok, n_out):
    torch.manual_seed(n_out)
    head = nn.Linear(H, n_out)
    b = Latent(end_head=head, max_steps=5, feedback=1).bind(model, latent_tok)
    assert b.max_steps == 5 and b.steps is None and b.layer == 1
    state = torch.randn(9, H)
    end = b.end_head(state)
    assert end.dtype == torch.bool and end.shape == (9,)
    z = head(state).detach()
    want = z[:, 0] > 0 if n_out == 1 else z[:, 1] > z[:, 0]
    assert torch.equal(end, want) and want.any() and not want.all()


def test_bind_end_head_any_module_and_by_name(model, latent_tok):
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(H, 8), nn.ReLU(), nn.Linear(8, 1), nn.Flatten(0))  # -> [B]
    state = torch.randn(7, H)
    b = Latent(end_head=mlp, max_steps=3).bind(model, latent_tok)
    assert torch.equal(b.end_head(state), mlp(state).detach() > 0)
    b = Latent(end_head="mine", max_steps=3).bind(model, latent_tok, end_heads={"mine": mlp})
    assert b.end_head.module is mlp
    model.cotrt_end_heads = {"bundled": mlp}  # as load_ccot_bundle registers heads
    try:
        assert Latent(end_head="bundled", max_steps=3).bind(model, latent_tok).end_head.module is mlp
    finally:
        del model.cotrt_end_heads
    half = nn.Linear(H, 2).double()  # the state is cast to the head's dtype
    assert Latent(end_head=half, max_steps=3).bind(model, latent_tok).end_head(state).shape == (7,)


def test_bind_projection(model, latent_tok):
    torch.manual_seed(0)
    lin = nn.Linear(H, H)
    b = Latent(steps=2, projection=lin).bind(model, latent_tok)
    assert torch.equal(b.proj_weight, lin.weight) and torch.equal(b.proj_bias, lin.bias)
    assert not b.proj_weight.requires_grad
    w64 = torch.randn(H, H, dtype=torch.float64)
    b = Latent(steps=2, projection=w64).bind(model, latent_tok)
    assert b.proj_weight.dtype == torch.float32 and b.proj_bias is None
    assert w64.dtype == torch.float64  # the caller's tensor is not converted in place


# ------------------------------------------------------------------------------ bind errors


class _Bad(nn.Module):
    def forward(self, x):
        raise RuntimeError("boom")


BIND_ERRORS = [
    (dict(steps=1, feedback=L), {}, "feedback: layer 2 is out of range for a model with 2 decoder layers"),
    (dict(steps=1, feedback=-L - 1), {}, "feedback: layer -3 is out of range"),
    (dict(steps=1, projection=nn.Linear(H, H + 1)), {}, r"projection: .*expected weight \[64, 64\], got \[65, 64\]"),
    (dict(steps=1, projection=torch.zeros(H, H - 1)), {}, r"projection: .*got \[64, 63\]"),
    (dict(steps=1, projection=torch.full((H, H), math.inf)), {}, "projection: has non-finite"),
    (dict(end_head=nn.Linear(H - 1, 1), max_steps=2), {}, r"end_head: .*H=64.*nn.Linear\(63, 1\)"),
    (dict(end_head=nn.Linear(H, 3), max_steps=2), {}, r"end_head: .*nn.Linear\(64, 3\)"),
    (dict(end_head=nn.Sequential(nn.Linear(H, 4)), max_steps=2), {}, r"end_head: .*returned \(2, 4\)"),
    (dict(end_head=_Bad(), max_steps=2), {}, "end_head: calling it on a .* failed: RuntimeError: boom"),
    (dict(end_head=nn.Linear(H, 1, device="meta"), max_steps=2), {}, "end_head: is on meta"),
    (dict(end_head="nope", max_steps=2), {"end_heads": {"other": nn.Linear(H, 1)}},
     r"end_head: no END head named 'nope'; known: \['other'\]"),
    (dict(end_head="x", max_steps=2), {"end_heads": {"x": lambda h: h}}, "end_head: head 'x' is a function"),
    (dict(steps=1, valve_during={"contemplate": 1.0}), {"valve_names": ["answer"]},
     "valve_during: no valve named 'contemplate'"),
    (dict(steps=1, begin_token=7, end_token=7), {}, "distinct ids"),
    (dict(steps=1, latent_token=10**6), {}, "latent_token=1000000 \\(id 1000000 >= the model's"),
]


@pytest.mark.parametrize("kw,bind_kw,match", BIND_ERRORS)
def test_bind_errors_change_nothing(model, latent_tok, kw, bind_kw, match):
    before = _snapshot(model, latent_tok)
    with pytest.raises(ValueError, match=match):
        Latent(**kw).bind(model, latent_tok, **bind_kw)
    _assert_unchanged(before, model, latent_tok)


def test_bind_missing_tokens_named_all_at_once(model, smol_tokenizer):
    before = _snapshot(model, smol_tokenizer)
    with pytest.raises(ValueError) as e:
        Latent(steps=2).bind(model, smol_tokenizer)
    msg = str(e.value)
    for name, tok in zip(("begin_token", "end_token", "latent_token"), TOKENS):
        assert f"{name}={tok!r} (not in the tokenizer)" in msg
    assert "load_coconut" in msg
    _assert_unchanged(before, model, smol_tokenizer)
    # With the latent tokens switched off the same tokenizer binds.
    Latent(steps=2, begin_token=None, end_token=None, latent_token=None).bind(model, smol_tokenizer)


def test_bind_tokens_added_but_model_not_resized(smol_tokenizer, latent_tok):
    small = tiny_model("llama", len(smol_tokenizer), seed=2)  # embeddings not resized
    before = _snapshot(small, latent_tok)
    with pytest.raises(ValueError, match="begin_token='<\\|start-latent\\|>' \\(id 49152 >= the model's 49152 "
                                         "embedding rows \\(resize_token_embeddings"):
        Latent(steps=1).bind(small, latent_tok)
    _assert_unchanged(before, small, latent_tok)
