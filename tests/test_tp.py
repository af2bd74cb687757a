"""Tensor parallel over torch.distributed (cotrt.parallel), on CPU over gloo with 2 ranks.

One ``torchrun --nproc-per-node 2`` launch (as ``python -m torch.distributed.run``) of
``tests/_tp_worker.py`` on tiny Llama / Qwen3 / Mistral models saved here, loaded by the
ranks with transformers' ``tp_plan="auto"``, serves both launch tests (each launch costs
two processes' imports, ~20 s of a 2-core CI machine):

- checks, each against the same model whole in one process, on every rank: greedy,
  seeded and unseeded sampling, a think budget, DEER probes, a PEFT valve (colwise and
  rowwise linears) at alpha 1.0 / 0.5 / 0, Coconut-style latent rows (final-norm and
  layer feedback), fused norms/rotary; a valve on Phi-3 (whose plan gathers qkv_proj and
  splits o_proj's replicated input);
- ``cotrt serve --tp 2`` (the CLI's entry point in the launched ranks), answered through
  the ``openai`` client, then stopped with SIGINT to rank 0;
- the lockstep driver (rank 0) and follower (rank 1) with an abort and a valve change,
  then rank 1 dying mid-generation.

Skipped where torch.distributed or gloo is missing. The ``--tp`` checks run in this process.
"""
from __future__ import annotations

import copy
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import cotrt
from cotrt.parallel import check_tp
from cotrt.parallel.group import available

pytestmark = pytest.mark.skipif(not available(), reason="torch.distributed with gloo is not available")

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ("llama", "qwen3", "mistral")


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("TRITON_INTERPRET", "1")
    env["OMP_NUM_THREADS"] = "1"  # two ranks on a 2-core CI machine
    env.pop("WORLD_SIZE", None)
    return env


def _torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
            str(_free_port()), *args]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# A chat template that opens thinking (R1 / Qwen3 style), for the server's chat route.
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}")


@pytest.fixture(scope="module")
def models(tmp_path_factory, byte_tokenizer):
    """Tiny models saved with a byte tokenizer that has <think>/</think> and the latent tokens,
    and a PEFT LoRA per model on q/v (colwise) and o/down (rowwise) projections; a Phi-3
    with a LoRA on its gathered and input-split projections."""
    pytest.importorskip("peft")
    from cotrt.testing import tiny_model
    from _peft import make_adapter

    out = tmp_path_factory.mktemp("tp_models")
    # Bytes, the latent tokens, <think>/</think>: a 262-token vocabulary keeps each wrap's
    # vocabulary scan and pattern compiles (11 wraps a rank) cheap.
    tok = copy.deepcopy(byte_tokenizer)
    tok.add_tokens(["<think>", "</think>"], special_tokens=False)
    tok.chat_template = TEMPLATE
    for i, arch in enumerate(ARCHS):
        model = tiny_model(arch, len(tok), seed=40 + i)
        model.save_pretrained(out / arch)
        tok.save_pretrained(out / arch)
        make_adapter(model, out / f"{arch}-lora", seed=i, std=0.3, r=4, lora_alpha=8,
                     target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])
    # Phi-3's plan gathers qkv_proj / gate_up_proj and splits o_proj / down_proj's input.
    model = tiny_model("phi3", len(tok), seed=43)
    model.save_pretrained(out / "phi3")
    tok.save_pretrained(out / "phi3")
    make_adapter(model, out / "phi3-lora", seed=3, std=0.3, r=4, lora_alpha=8,
                 target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
    return out


class Launch:
    """The one torchrun launch of tests/_tp_worker.py (2 ranks): its server's URL once the
    checks are done and rank 0 serves; ``finish()`` stops the server (SIGINT to rank 0),
    waits for the launch to end and returns both ranks' results."""

    def __init__(self, models: Path, out: Path):
        self.models, self.out, self.port = models, out, _free_port()
        self.t0 = time.monotonic()
        self.t_serving = None
        self.proc = subprocess.Popen(
            _torchrun(str(ROOT / "tests" / "_tp_worker.py"), str(models), str(out), str(self.port)),
            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.log: list[str] = []
        threading.Thread(target=lambda: self.log.extend(self.proc.stdout), daemon=True).start()
        self.url = f"http://127.0.0.1:{self.port}"
        self.results = None

    def text(self, n=6000) -> str:
        return "".join(self.log)[-n:]

    def wait_serving(self) -> str:
        import httpx

        while self.t_serving is None:
            assert self.proc.poll() is None, "the launch ended before serving:\n" + self.text()
            assert time.monotonic() - self.t0 < 400, "the server did not start:\n" + self.text()
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    self.t_serving = time.monotonic() - self.t0
            except httpx.HTTPError:
                time.sleep(0.5)
        return self.url

    def finish(self) -> tuple:
        import psutil

        if self.results is None:
            try:
                self.wait_serving()
                ranks = {c.environ().get("RANK"): c for c in psutil.Process(self.proc.pid).children()}
                ranks["0"].send_signal(signal.SIGINT)
                self.proc.wait(120)
            finally:
                self.kill()
            assert self.proc.returncode == 0, self.text()
            self.results = tuple(json.loads((self.out / f"rank{r}.json").read_text()) for r in (0, 1))
            print(f"\ntorchrun launch: serving after {self.t_serving:.1f} s, done after "
                  f"{time.monotonic() - self.t0:.1f} s; rank 0: {self.results[0]['times']}")
        return self.results

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture(scope="module")
def launch(models, tmp_path_factory):
    pytest.importorskip("fastapi")
    run = Launch(models, tmp_path_factory.mktemp("tp_out"))
    yield run
    run.kill()


def test_serve_tp_answers_openai_client(launch):
    """``cotrt serve --tp 2`` under torchrun: rank 0 serves, rank 1 follows; completions
    (greedy, seeded, concurrent, chat) equal one process's; an abandoned stream's abort and
    an idle spell past the heartbeat interval keep the ranks together."""
    openai = pytest.importorskip("openai")
    import httpx

    url = launch.wait_serving()
    path = str(launch.models / "llama")
    ref = cotrt.wrap(*cotrt.load_model(path, quiet=True), max_batch=4, max_len=128)
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)

    def ref_text(prompt, **kw):
        return ref.generate([prompt], cotrt.Params(max_new_tokens=8, ignore_eos=True, **kw))[0].text

    def completion(prompt, **kw):
        return client.completions.create(model=path, prompt=prompt, max_tokens=8,
                                         extra_body={"cotrt": {"ignore_eos": True}}, **kw).choices[0].text

    assert completion("Once upon a time", temperature=0) == ref_text("Once upon a time", temperature=0)
    # Concurrent seeded requests share the ranks' batches; each equals its lone reference.
    prompts = [f"Story {i}: the" for i in range(4)]
    got = [None] * 4
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, completion(prompts[i], temperature=1.0,
                                                                               seed=10 + i))) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got == [ref_text(p, temperature=1.0, seed=10 + i) for i, p in enumerate(prompts)]
    # A stream left after two chunks: its abort reaches rank 1 with the next step.
    stream = client.chat.completions.create(model=path, messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=100, temperature=0, stream=True)
    for _, _chunk in zip(range(2), stream):
        pass
    stream.close()
    time.sleep(6)  # idle past the heartbeat interval (--tp-timeout / 4 = 5 s)
    chat = client.chat.completions.create(model=path, messages=[{"role": "user", "content": "Hi"}], max_tokens=8,
                                          temperature=0, extra_body={"cotrt": {"ignore_eos": True}})
    want = ref.chat([[{"role": "user", "content": "Hi"}]], cotrt.Params(max_new_tokens=8, temperature=0,
                                                                        ignore_eos=True))[0]
    msg = chat.choices[0].message
    assert (getattr(msg, "reasoning_content", None) or "", msg.content or "") == (want.reasoning, want.answer)
    assert want.reasoning  # the template opened <think>: the 8 tokens are reasoning
    metrics = httpx.get(url + "/metrics").text
    assert 'cotrt_requests_total{outcome="abort"} 1' in metrics
    assert 'cotrt_requests_total{outcome="error"} 0' in metrics


def test_tp_matches_one_process(launch):
    """On both ranks, every check's tokens equal one process's; the lockstep phase kept
    the ranks together and a dead rank failed the group at once."""
    r0, r1 = launch.finish()
    for name, c in r0["checks"].items():
        if "ref" in c:
            assert c["tp"] == c["ref"], f"{name}: TP tokens differ from one process"
            assert c["tp_stats"] == c["ref_stats"], f"{name}: TP stats differ from one process"
        if name in r1["checks"]:
            assert r1["checks"][name]["tp"] == c["tp"], f"{name}: rank 1 holds other tokens than rank 0"
    assert set(r1["checks"]) >= set(r0["checks"]) - {"lockstep"}
    for arch in ARCHS:
        assert r0["kv_heads"][arch] == [1, 2]  # 2 KV heads: one per rank in each rank's cache
        assert r0["cpu_linear"][arch] == 0  # sharded linears are left to HF's TP forward
        assert r0["valve_modules"][arch] == ["ShardedValveLinear"]
        # The checks saw what they claim to check.
        assert all(s["think_end"] == "think_budget" for s in r0["checks"][f"{arch}/think_budget"]["tp_stats"])
        assert any(s["probes"] for s in r0["checks"][f"{arch}/deer"]["tp_stats"]), arch
        valve, greedy = r0["checks"][f"{arch}/valve"]["tp"], r0["checks"][f"{arch}/greedy"]["tp"]
        assert valve[0] != greedy[0], f"{arch}: the valve at alpha 1 changed nothing"
        assert valve[2] == greedy[2]  # alpha 0 is the base model
    for name in ("latent/final_norm", "latent/layer0"):
        c = r0["checks"][name]
        assert all(s["latent_steps"] == 3 for s in c["tp_stats"])
        assert c["state_err"] < 1e-4, f"{name}: fed-back states differ from one process by {c['state_err']}"
        assert c["state_sha"] == r1["checks"][name]["state_sha"], f"{name}: ranks fed back different states"
    assert r0["checks"]["llama/fused"]["fused"].get("norms")
    assert r0["valve_modules"]["phi3"] == ["colwise_gather_output", "rowwise_split_input"]
    assert r0["checks"]["phi3/valve"]["tp"][0] != r0["checks"]["phi3/valve"]["tp"][2]
    # The server phase: rank 0 stopped by SIGINT, rank 1 released by it.
    assert r0["serve"]["status"] == "interrupted" and r1["serve"]["status"] == 0
    # Lockstep: rank 1 replayed rank 0's requests, abort and valve change (digests agreed);
    # then rank 1 died and rank 0 failed fast with a clear error.
    assert r0["lockstep_steps"] > 0
    death = r0["death"]
    assert death["raised"] and "tensor-parallel" in death["raised"], death
    assert death["seconds"] < 15, death
    assert "TPGroupError" in r0["after_death"]
    assert "died_at_step" in r1


def test_check_tp():
    assert check_tp(1, {}) == 1
    assert check_tp(2, {"WORLD_SIZE": "2"}) == 2
    with pytest.raises(ValueError, match="torchrun --nproc-per-node 2"):
        check_tp(2, {})
    with pytest.raises(ValueError, match="does not match the 2 processes"):
        check_tp(1, {"WORLD_SIZE": "2"})
    for bad in (0, -1, True, "2"):
        with pytest.raises(ValueError, match="--tp must be an int"):
            check_tp(bad, {})


def test_serve_tp_flag_checked_before_loading(capsys, monkeypatch):
    pytest.importorskip("fastapi")
    from cotrt.cli import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["serve", "--model", "/nonexistent/model", "--tp", "2", "--port", str(_free_port())]) == 2
    err = capsys.readouterr().err
    assert "--tp 2 needs 2 processes" in err and "torchrun" in err


def test_readme_torchrun_command_parses():
    """The README's torchrun line is a `cotrt serve` command whose --tp matches its ranks."""
    from cotrt.cli import build_parser

    line = next(ln for ln in (ROOT / "README.md").read_text().splitlines() if ln.startswith("torchrun "))
    args = shlex.split(line)
    at = args.index("-m")
    assert args[at + 1] == "cotrt"
    ns = build_parser().parse_args(args[at + 2:])
    assert ns.cmd == "serve" and ns.tp == int(args[args.index("--nproc-per-node") + 1]) > 1
