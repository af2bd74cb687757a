"""bench/gpu_suite.py: the whole script on CPU (--smoke), its parity report, its budget
skips; on a GPU (marker ``gpu``), its correctness section in bf16."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_suite.py"
MODELS = ("smollm2-135m", "qwen2.5-0.5b", "llama-3.2-1b")


def _run(*args, timeout=180):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_smoke_runs_every_section(tmp_path):
    out = tmp_path / "suite.json"
    # A generous budget: the smoke run takes ~20 s on a quiet 2-core machine, but under load
    # its 50 s default skipped the parity section (that skip is tested on its own below).
    r = _run("--smoke", "--budget", "400", "--out", str(out), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["errors"] == [], res["errors"]
    assert res["skipped"] == []
    assert res["meta"]["torch"] == torch.__version__ and res["meta"]["date_utc"]
    corr = res["correctness"]
    assert corr["ok"], corr
    assert {k["op"] for k in corr["kernels"]} == {"valve_lora", "decode_attention", "contemplate"}
    assert [p["model"] for p in corr["parity"]] == list(MODELS)
    assert all(r["verdict"] == "ok" for p in corr["parity"] for r in p["rows"])  # fp32: exact
    cells = {(c["model"], c["batch"], c["provider"]) for c in res["decode"]}
    assert cells == {(m, b, p) for m in MODELS for b in (1, 4) for p in ("cotrt", "hf_eager")} | {
        (m, 1, p) for m in MODELS for p in ("cotrt_eager", "cotrt_unfused")}
    for c in res["decode"]:  # the cotrt cells ran the graphs' static step
        if c["provider"] in ("cotrt", "cotrt_unfused"):
            assert c["graphs"]["mode"] == "static" and c["graphs"]["static_steps"] > 0 and not c["graphs"]["failed"]
    for c in res["decode"]:  # a per-step figure, or the reason there is none (timing noise)
        if c["decode_tok_s"] is None:
            assert "timing_note" in c and "gbps" not in c, c
        else:
            assert c["decode_tok_s"] > 0 and c["gbps"] > 0, c
    assert {(c["model"], c["batch"]) for c in res["hf_compiled"]} == {(m, b) for m in MODELS for b in (1, 4)}
    assert all("error" not in c for c in res["hf_compiled"])
    assert [r["M"] for r in res["valve_lora"]] == [1, 2]
    has_peft = importlib.util.find_spec("peft") is not None
    assert all(("peft_unmerged" in r) == has_peft for r in res["valve_lora"])
    assert [r["batch"] for r in res["latent"]] == [1, 8]
    assert len(res["decode_attention"]) == 3 * 2 * 2 and all(r["kernel_vs_sdpa"] > 0 for r in res["decode_attention"])
    assert res["valve_e2e"]["valve_vs_none"] > 0
    assert set(res["goals"]) >= {"llama_1b_b1_roofline_frac", "smollm2_b1_cotrt_vs_hf_eager"}
    # The table comes last: header, separator, one row per (model, batch).
    lines = r.stdout.strip().splitlines()
    table = lines[-8:]
    assert table[0].startswith("| model | batch | cotrt tok/s")
    assert table[1].startswith("|---")
    assert [ln.split("|")[1].strip() for ln in table[2:]] == [m for m in MODELS for _ in (1, 4)]
    assert "correctness: kernels 10/10 ok" in r.stdout


def test_budget_skips_and_still_reports(tmp_path):
    out = tmp_path / "suite.json"
    r = _run("--smoke", "--budget", "1", "--sections", "decode,hf_compiled", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert any(s.startswith("hf_compiled") for s in res["skipped"]), res["skipped"]
    assert "correctness" not in res and res["hf_compiled"] == []
    assert r.stdout.strip().splitlines()[-1].startswith("|")


def test_parity_reports_first_divergence_and_gap():
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_suite as gs

    plan = gs.Plan(smoke=True, budget_s=None)
    tok = gs.build_tokenizer()
    model = gs.build_model("llama-3.2-1b", plan, tok)

    class FakeRuntime:  # HF's own greedy tokens, with row 1 changed at step 3 to its worst token
        def generate(self, ps, params):
            outs = []
            for i, p in enumerate(ps):
                ids = torch.tensor([p])
                with torch.no_grad():
                    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                         max_new_tokens=params.max_new_tokens)
                    toks = out[0, len(p):].tolist()
                    if i == 1:
                        logits = model(torch.tensor([p + toks[:3]])).logits[0, -1]
                        toks[3] = int(logits.argmin())
                outs.append(type("Out", (), {"token_ids": toks}))
            return outs

    r = gs.parity("llama-3.2-1b", model, FakeRuntime(), plan)
    assert not r["ok"]
    rows = r["rows"]
    assert [x["verdict"] for x in rows] == ["ok", "MISMATCH", "ok"]
    bad = rows[1]
    assert bad["first_divergence"] == 3 and bad["gap"] > bad["tie_tolerance"] > 0
    assert bad["top2_gap"] >= 0 and bad["hf_logit"] > bad["cotrt_logit"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_correctness_section(tmp_path):
    """Kernels against their fp32 references in bf16, greedy parity with HF (ties allowed
    only within the bf16 tolerance; the fp32 anchor must match)."""
    out = tmp_path / "suite.json"
    r = _run("--sections", "correctness", "--strict", "--out", str(out), timeout=600)
    res = json.loads(out.read_text())
    assert r.returncode == 0, json.dumps(res["correctness"], indent=1)[-4000:] + r.stderr[-2000:]
    assert res["correctness"]["ok"] and not res["errors"]
    assert any(p["dtype"] == "torch.float32" for p in res["correctness"]["parity"])
