"""cotrt.loaders: Coconut checkpoints onto tiny random Llama / Qwen2 bases, CCoT bundles with
two real PEFT LoRAs written by save_ccot_bundle and read back, and every error case leaving
model, tokenizer and loaded valves unchanged."""
import copy
import json
import shutil

import pytest
import torch
from torch import nn

from cotrt.testing import tiny_model
from cotrt.latent import Latent
from cotrt.loaders import COCONUT_TOKENS, load_ccot_bundle, load_coconut, save_ccot_bundle
from cotrt.valve import ValveLinear, ValveSet

peft = pytest.importorskip("peft")
H = 64


def _snapshot(model, tok):
    return ({k: v.clone() for k, v in model.state_dict().items()}, repr(model), len(tok), tok.get_vocab(),
            {k: v for k, v in vars(model).items() if k.startswith("cotrt_")})


def _assert_unchanged(before, model, tok):
    sd, rep, n, vocab, extra = before
    after = model.state_dict()
    assert sd.keys() == after.keys()
    assert all(sd[k].shape == after[k].shape and torch.equal(sd[k], after[k]) for k in sd)
    assert repr(model) == rep and len(tok) == n and tok.get_vocab() == vocab
    assert {k: v for k, v in vars(model).items() if k.startswith("cotrt_")} == extra
    assert not any(isinstance(m, ValveLinear) for m in model.modules()) or extra.get("cotrt_valves")


# ------------------------------------------------------------------------------ Coconut


class CoconutWrapper(nn.Module):
    """What Coconut's training code saves: the HF model as ``base_causallm`` and its input
    embedding again as ``embedding``."""

    def __init__(self, base, alias=True):
        super().__init__()
        self.base_causallm = base
        if alias:
            self.embedding = base.get_input_embeddings()


def _coconut_checkpoint(arch, tok, *, tie=False, alias=True, seed=3):
    """(state dict, trained model): a base with the latent tokens added, resized and
    perturbed (standing in for training)."""
    t = copy.deepcopy(tok)
    t.add_tokens(list(COCONUT_TOKENS))
    trained = tiny_model(arch, len(tok), seed=seed, tie_word_embeddings=tie)
    trained.resize_token_embeddings(len(t), mean_resizing=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return CoconutWrapper(trained, alias).state_dict(), trained


@pytest.mark.parametrize("arch,tie,alias,via_file", [("llama", False, True, True), ("qwen2", True, False, False),
                                                     ("qwen2", True, True, False)])
def test_coconut_roundtrip(smol_tokenizer, tmp_path, arch, tie, alias, via_file):
    sd, trained = _coconut_checkpoint(arch, smol_tokenizer, tie=tie, alias=alias)
    if via_file:
        torch.save(sd, tmp_path / "checkpoint_6")
        sd = tmp_path / "checkpoint_6"
    base, tok = tiny_model(arch, len(smol_tokenizer), seed=9, tie_word_embeddings=tie), copy.deepcopy(smol_tokenizer)
    model, tok2, latent = load_coconut(base, tok, sd, steps=6)
    assert model is base and tok2 is tok
    ids = tok.convert_tokens_to_ids(list(COCONUT_TOKENS))
    assert ids == [len(smol_tokenizer) + i for i in range(3)]
    assert isinstance(latent, Latent) and latent.steps == 6 and latent.feedback == "final_norm"
    assert [latent.begin_token, latent.end_token, latent.latent_token] == ids
    want = trained.state_dict()
    got = model.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    if tie:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    x = torch.tensor([[5, 17, ids[0], ids[2], ids[2], ids[1], 99]])
    with torch.no_grad():
        assert torch.equal(model(x).logits, trained(x).logits)
    # It binds: the spec's ids are in range of the resized model.
    assert latent.bind(model, tok).latent_id == ids[2]


def test_coconut_tokenizer_already_has_tokens(smol_tokenizer):
    sd, trained = _coconut_checkpoint("llama", smol_tokenizer)
    tok = copy.deepcopy(smol_tokenizer)
    tok.add_tokens(list(COCONUT_TOKENS))
    n = len(tok)
    model, _, latent = load_coconut(tiny_model("llama", len(smol_tokenizer)), tok, sd)
    assert len(tok) == n and latent.steps == 0 and latent.begin_token == len(smol_tokenizer)
    assert torch.equal(model.lm_head.weight, trained.lm_head.weight)


def _edit(sd, drop=(), **put):
    out = {k: v for k, v in sd.items() if k not in drop}
    out.update({k.replace("__", "."): v for k, v in put.items()})
    return out


Q = "base_causallm.model.layers.0.self_attn.q_proj.weight"


@pytest.mark.parametrize("case,match", [
    ("prefix", "key\\(s\\) lack the 'base_causallm.' prefix"),
    ("shape", r"shape mismatch for 'base_causallm.model.layers.0.self_attn.q_proj.weight': checkpoint \[64, 63\], "
              r"model \[64, 64\]"),
    ("vocab", "vocabulary mismatch: the checkpoint has 49153 embedding rows but the tokenizer with the latent "
              "tokens needs 49155"),
    ("missing", "missing keys: 'model.layers.0.self_attn.q_proj.weight'; unexpected keys: none"),
    ("unexpected", "unexpected keys: 'extra.weight'"),
    ("alias", "'embedding.weight' differs from 'base_causallm.model.embed_tokens.weight'"),
    ("lm_rows", r"shape mismatch for 'base_causallm.lm_head.weight': checkpoint \[49154, 64\], model \[49155, 64\]"),
    ("not_tensor", "not a state dict of tensors"),
])
def test_coconut_errors_change_nothing(smol_tokenizer, case, match):
    sd, _ = _coconut_checkpoint("llama", smol_tokenizer)
    emb = sd["base_causallm.model.embed_tokens.weight"]
    if case == "prefix":
        sd = {k.replace("base_causallm.", ""): v for k, v in sd.items()}
    elif case == "shape":
        sd[Q] = sd[Q][:, :63]
    elif case == "vocab":
        small = emb[: len(smol_tokenizer) + 1]
        sd.update({"base_causallm.model.embed_tokens.weight": small, "embedding.weight": small,
                   "base_causallm.lm_head.weight": sd["base_causallm.lm_head.weight"][: len(smol_tokenizer) + 1]})
    elif case == "missing":
        sd = _edit(sd, drop=[Q])
    elif case == "unexpected":
        sd["base_causallm.extra.weight"] = torch.zeros(1)
    elif case == "alias":
        sd["embedding.weight"] = emb + 1
    elif case == "lm_rows":
        sd["base_causallm.lm_head.weight"] = sd["base_causallm.lm_head.weight"][:-1]
    elif case == "not_tensor":
        sd["base_causallm.note"] = "hello"
    base, tok = tiny_model("llama", len(smol_tokenizer), seed=4), copy.deepcopy(smol_tokenizer)
    before = _snapshot(base, tok)
    with pytest.raises(ValueError, match=match):
        load_coconut(base, tok, sd)
    _assert_unchanged(before, base, tok)


def test_coconut_tied_head_must_match(smol_tokenizer):
    sd, _ = _coconut_checkpoint("qwen2", smol_tokenizer, tie=True)
    sd["base_causallm.lm_head.weight"] = sd["base_causallm.lm_head.weight"] * 2
    base, tok = tiny_model("qwen2", len(smol_tokenizer), tie_word_embeddings=True), copy.deepcopy(smol_tokenizer)
    before = _snapshot(base, tok)
    with pytest.raises(ValueError, match="ties its LM head .* 'base_causallm.lm_head.weight' differs"):
        load_coconut(base, tok, sd)
    _assert_unchanged(before, base, tok)


def test_coconut_bad_arguments(smol_tokenizer, tmp_path):
    base, tok = tiny_model("llama", len(smol_tokenizer)), copy.deepcopy(smol_tokenizer)
    before = _snapshot(base, tok)
    with pytest.raises(ValueError, match="is not a file"):
        load_coconut(base, tok, tmp_path / "nope")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="holds a list, not a state dict"):
        load_coconut(base, tok, tmp_path / "list.pt")
    with pytest.raises(ValueError, match="steps must be an int >= 0"):
        load_coconut(base, tok, {}, steps=-1)
    with pytest.raises(TypeError, match="state dict or a path"):
        load_coconut(base, tok, 42)
    _assert_unchanged(before, base, tok)


# ------------------------------------------------------------------------------ CCoT bundle


@pytest.fixture(scope="module")
def ccot(smol_tokenizer, tmp_path_factory):
    """A tiny Llama base, two real PEFT LoRAs on it (random non-zero A and B; different
    targets and ranks), an END head and a projection, saved as a bundle."""
    tmp = tmp_path_factory.mktemp("ccot")
    base = tiny_model("llama", len(smol_tokenizer), seed=5)
    peft_models = {}
    for name, targets, r in (("contemplate", ["q_proj", "v_proj"], 4), ("answer", ["o_proj", "down_proj"], 8)):
        torch.manual_seed(len(name))
        cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False)
        peft_models[name] = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
    peft_models["contemplate"].save_pretrained(str(tmp / "contemplate"))
    torch.manual_seed(0)
    head, proj = nn.Linear(H, 2), nn.Linear(H, H)
    path = save_ccot_bundle(tmp / "bundle", contemplate=tmp / "contemplate", answer=peft_models["answer"],
                            end_head=head, feedback_layer=-1, max_steps=5, projection=proj, base=None,
                            name="ccot-tiny")
    return dict(base=base, peft=peft_models, head=head, proj=proj, path=path, tmp=tmp)


def test_bundle_files(ccot):
    root = ccot["path"]
    m = json.loads((root / "cotrt_bundle.json").read_text())
    assert m["format"] == "cotrt-ccot/1" and m["feedback_layer"] == -1 and m["max_steps"] == 5
    assert m["valves"] == {"contemplate": "valves/contemplate", "answer": "valves/answer"}
    for v in ("contemplate", "answer"):
        assert (root / "valves" / v / "adapter_config.json").is_file()
    assert not list(root.parent.glob(".bundle.tmp*"))


def test_bundle_roundtrip_matches_peft(ccot, smol_tokenizer):
    model = copy.deepcopy(ccot["base"])
    tok = copy.deepcopy(smol_tokenizer)
    out_model, out_tok, latent = load_ccot_bundle(ccot["path"], model=model, tokenizer=tok)
    assert out_model is model and out_tok is tok
    assert latent.max_steps == 5 and latent.feedback == -1 and latent.steps is None
    assert dict(latent.valve_during) == {"contemplate": 1.0} and dict(latent.valve_after) == {"answer": 1.0}
    assert latent.begin_token is None and latent.end_token is None and not latent.insert_begin
    assert torch.equal(latent.end_head.weight, ccot["head"].weight)
    assert torch.equal(latent.projection.bias, ccot["proj"].bias)
    assert model.cotrt_end_heads == {"ccot-tiny": latent.end_head}
    vs = model.cotrt_valves
    assert isinstance(vs, ValveSet) and vs.names == ["contemplate", "answer"]
    b = latent.bind(model, tok, valve_names=vs.names)
    assert b.layer == 1 and b.max_steps == 5 and b.proj_weight is not None
    by_name = Latent(end_head="ccot-tiny", max_steps=2, begin_token=None, end_token=None, latent_token=None)
    assert by_name.bind(model, tok).end_head.module is latent.end_head

    x = torch.tensor([[3, 14, 15, 92, 65, 35]])
    with torch.no_grad():
        for name in ("contemplate", "answer"):
            vs.state.set_uniform(1.0, vs.index(name))
            want = ccot["peft"][name](input_ids=x).logits
            torch.testing.assert_close(model(x).logits, want, rtol=1e-5, atol=1e-4)
        vs.state.clear()
        assert torch.equal(model(x).logits, ccot["base"](x).logits)


def test_bundle_via_runtime(ccot, smol_tokenizer):
    class WithLoadValve:  # the runtime's API from the valve issue
        def __init__(self, model, tok):
            self.model, self.tokenizer, self.calls = model, tok, []

        def load_valve(self, path, name):
            self.calls.append((path, name))

    class WithoutLoadValve:  # today's Runtime: no load_valve -> a ValveSet on the model
        def __init__(self, model, tok):
            self.model, self.tokenizer = model, tok

    rt = WithLoadValve(copy.deepcopy(ccot["base"]), smol_tokenizer)
    model, _, latent = load_ccot_bundle(ccot["path"], runtime=rt)
    assert model is rt.model and [n for _, n in rt.calls] == ["contemplate", "answer"]
    assert rt.calls[0][0].endswith("valves/contemplate") and not hasattr(model, "cotrt_valves")
    rt2 = WithoutLoadValve(copy.deepcopy(ccot["base"]), smol_tokenizer)
    assert load_ccot_bundle(ccot["path"], runtime=rt2)[0].cotrt_valves.names == ["contemplate", "answer"]
    with pytest.raises(ValueError, match="model= differs from runtime.model"):
        load_ccot_bundle(ccot["path"], model=ccot["base"], runtime=rt2)


def test_bundle_loads_its_base(ccot, smol_tokenizer, tmp_path):
    root = tmp_path / "b"
    shutil.copytree(ccot["path"], root)
    ccot["base"].save_pretrained(root / "base")
    smol_tokenizer.save_pretrained(root / "base")
    m = json.loads((root / "cotrt_bundle.json").read_text())
    (root / "cotrt_bundle.json").write_text(json.dumps({**m, "base": "base"}))
    model, tok, latent = load_ccot_bundle(root)
    assert torch.equal(model.lm_head.weight, ccot["base"].lm_head.weight) and len(tok) == len(smol_tokenizer)
    assert model.cotrt_valves.names == ["contemplate", "answer"]


def _manifest_edit(**kw):
    def f(root):
        p = root / "cotrt_bundle.json"
        m = json.loads(p.read_text())
        m.update(kw)
        p.write_text(json.dumps(m))
    return f


def _write(rel, text):
    def f(root):
        (root / rel).write_text(text)
    return f


def _head_file(weight):
    def f(root):
        from safetensors.torch import save_file

        save_file({"weight": weight}, str(root / "end_head.safetensors"))
    return f


def _break_answer(root):
    p = root / "valves" / "answer" / "adapter_config.json"
    cfg = json.loads(p.read_text())
    p.write_text(json.dumps({**cfg, "target_modules": ["o_proj", "down_proj", "gate_proj"]}))


BUNDLE_ERRORS = [
    (_manifest_edit(feedback_layer=2), "feedback: layer 2 is out of range"),
    (_head_file(torch.zeros(1, H - 1)), r"end_head: .*H=64.*nn.Linear\(63, 1\)"),
    (_head_file(torch.zeros(3, H)), r"end_head \(end_head.safetensors\): weight must be \[1, H\]"),
    (lambda r: (r / "end_head.safetensors").unlink(), "end_head: .* is missing"),
    (_manifest_edit(projection="../x.safetensors"), "projection must be a relative path inside the bundle"),
    (_manifest_edit(valve_during={"think": 1.0}), "valve_during names valve 'think'"),
    (_manifest_edit(format="cotrt-ccot/9"), "format must be 'cotrt-ccot/1'"),
    (_manifest_edit(max_steps=0), "max_steps: must be an int >= 1"),
    (_manifest_edit(colour="red"), "unknown field"),
    (_manifest_edit(tokens={"begin": "<|nope|>"}), "begin_token='<\\|nope\\|>' \\(not in the tokenizer\\)"),
    (_write("cotrt_bundle.json", "{"), "not valid JSON"),
    (_break_answer, "valve 'answer': adapter_config.json targets module"),
    (lambda r: shutil.rmtree(r / "valves" / "contemplate"), "valve 'contemplate': .* has no adapter_config.json"),
]


@pytest.mark.parametrize("mutate,match", BUNDLE_ERRORS)
def test_bundle_errors_change_nothing(ccot, smol_tokenizer, tmp_path, mutate, match):
    root = tmp_path / "b"
    shutil.copytree(ccot["path"], root)
    mutate(root)
    model, tok = copy.deepcopy(ccot["base"]), copy.deepcopy(smol_tokenizer)
    before = _snapshot(model, tok)
    with pytest.raises(ValueError, match=match):
        load_ccot_bundle(root, model=model, tokenizer=tok)
    _assert_unchanged(before, model, tok)


def test_bundle_twice_clashes_and_changes_nothing(ccot, smol_tokenizer):
    model, tok = copy.deepcopy(ccot["base"]), copy.deepcopy(smol_tokenizer)
    load_ccot_bundle(ccot["path"], model=model, tokenizer=tok)
    before = _snapshot(model, tok)
    with pytest.raises(ValueError, match=r"valve name\(s\) \['answer', 'contemplate'\] are already loaded"):
        load_ccot_bundle(ccot["path"], model=model, tokenizer=tok)
    _assert_unchanged(before, model, tok)
    assert model.cotrt_valves.names == ["contemplate", "answer"]


def test_bundle_needs_a_model(ccot, smol_tokenizer):
    with pytest.raises(ValueError, match="names no base model"):
        load_ccot_bundle(ccot["path"])
    with pytest.raises(ValueError, match="model= needs tokenizer="):
        load_ccot_bundle(ccot["path"], model=ccot["base"])
    with pytest.raises(ValueError, match="no cotrt_bundle.json"):
        load_ccot_bundle(ccot["tmp"])


def test_bundle_with_final_norm_feedback(ccot, smol_tokenizer, tmp_path):
    """``feedback_layer="final_norm"``: the final norm's output is fed back (the latent
    testbed's CCoT); it round-trips into ``Latent.feedback``."""
    path = save_ccot_bundle(tmp_path / "fn", contemplate=ccot["path"] / "valves" / "contemplate",
                            answer=ccot["path"] / "valves" / "answer", end_head=nn.Linear(H, 1),
                            feedback_layer="final_norm", max_steps=4, base=None)
    assert json.loads((path / "cotrt_bundle.json").read_text())["feedback_layer"] == "final_norm"
    _, _, latent = load_ccot_bundle(path, model=copy.deepcopy(ccot["base"]), tokenizer=copy.deepcopy(smol_tokenizer))
    assert latent.feedback == "final_norm" and latent.max_steps == 4


@pytest.mark.parametrize("kw,match", [
    (dict(end_head=nn.Linear(H, 3)), r"weight must be \[1, H\] .* got \[3, 64\]"),
    (dict(end_head="head"), "end_head must be an nn.Linear"),
    (dict(projection={"weight": torch.zeros(H, H), "scale": torch.ones(1)}), "projection: unexpected keys"),
    (dict(feedback_layer="1"), "feedback_layer must be an int .* or 'final_norm'"),
    (dict(max_steps=-2), "max_steps: must be an int >= 1"),
    (dict(tokens={"start": "<s>"}), "tokens must be a dict with keys among"),
    (dict(contemplate="/nonexistent"), "contemplate: '/nonexistent' is neither a PEFT model"),
    (dict(exists=True), "exists and is not empty"),
])
def test_save_bundle_errors_write_nothing(ccot, tmp_path, kw, match):
    dest = tmp_path / "out"
    if kw.pop("exists", False):
        dest.mkdir()
        (dest / "keep").write_text("x")
    args = dict(contemplate=ccot["path"] / "valves" / "contemplate", answer=ccot["path"] / "valves" / "answer",
                end_head=nn.Linear(H, 1), feedback_layer=1, max_steps=4)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        save_ccot_bundle(dest, **args)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out"] if dest.exists() else [])
    if dest.exists():
        assert [p.name for p in dest.iterdir()] == ["keep"]
