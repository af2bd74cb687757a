"""cpu_linear: the CPU decode-linear kernel (cotrt._cpu) against cpu_linear_ref / valve_lora_ref,
and the module swap (cotrt.layers.cpu_linear) inside and outside cotrt's forwards."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cotrt.testing import assert_close, assert_flash_rule
from cotrt.ops.cpu_linear import HAS_CPU_KERNEL, cpu_linear, cpu_linear_ref

pytestmark = pytest.mark.skipif(not HAS_CPU_KERNEL, reason="cotrt._cpu is not built")

ALPHAS = [0.0, 0.5, 1.0, 1.7, -0.8]


def make(M, K, N, *, dtype=torch.float32, seed=0, bias=False, lora=None, noncontig_x=False):
    """Inputs scaled so outputs are O(1). lora=(n, r): a bank, lora_b N-major as ValveLinear
    keeps it; alpha cycles 0 / positive / negative; adapter indices include -1."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    x = rnd(M, 2 * K)[:, ::2] if noncontig_x else rnd(M, K)
    c = dict(x=x, weight=rnd(N, K, scale=K**-0.5), bias=rnd(N) if bias else None)
    if lora is not None:
        n, r = lora
        c["lora_a"] = rnd(n, r, K, scale=K**-0.5)
        c["lora_b"] = rnd(N, n, r, scale=r**-0.5).permute(1, 0, 2)
        c["alpha"] = torch.tensor([ALPHAS[(i + seed) % len(ALPHAS)] for i in range(M)], dtype=torch.float32)
        c["adapter_idx"] = torch.randint(-1, n, (M,), generator=g).to(torch.int64 if seed % 2 else torch.int32)
    return c


def check(c, msg):
    y = cpu_linear(**c)
    assert y.dtype == c["x"].dtype and y.shape == (c["x"].shape[0], c["weight"].shape[0])
    ref = cpu_linear_ref(**c)
    if c["x"].dtype == torch.float32:
        assert_close(y, ref, msg=msg)
    else:  # bf16: no worse than 2x plain bf16 PyTorch against the fp32 reference
        base = F.linear(c["x"], c["weight"], c["bias"])
        if "lora_a" in c:
            from cotrt.ops.valve_lora import valve_lora
            base = valve_lora(**c)
        assert_flash_rule(y, ref, base, msg=msg)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 3, 8])
@pytest.mark.parametrize("N,K", [(7, 13), (111, 576), (1536, 577), (577, 1536)])
def test_base_matches_reference(dtype, M, N, K):
    for bias in (False, True):
        check(make(M, K, N, dtype=dtype, seed=M + N, bias=bias), f"{dtype} M={M} N={N} K={K} bias={bias}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 3, 8])
@pytest.mark.parametrize("n,r", [(1, 16), (3, 5), (2, 11)])
def test_valve_matches_reference(dtype, M, n, r):
    for seed in (0, 1):  # int32 and int64 adapter indices
        c = make(M, 579, 131, dtype=dtype, seed=seed, bias=True, lora=(n, r), noncontig_x=True)
        check(c, f"{dtype} M={M} n={n} r={r} seed={seed}")


def test_valve_base_only_rows_are_the_base_result_bit_for_bit():
    c = make(8, 64, 33, seed=2, lora=(2, 4))
    c["alpha"] = torch.tensor([0.0, 1.0, -2.0, 0.0, 0.5, 1.0, 3.0, 0.0])
    c["adapter_idx"] = torch.tensor([0, -1, 1, 1, 0, 5, -1, -1], dtype=torch.int32)  # 5: past the bank
    y = cpu_linear(**c)
    base = cpu_linear(c["x"], c["weight"])
    only = torch.tensor([1, 1, 0, 1, 0, 1, 1, 1], dtype=torch.bool)
    assert torch.equal(y[only], base[only])
    assert not torch.equal(y[~only], base[~only])
    assert_close(y, cpu_linear_ref(**c))


def test_alpha_broadcast_and_default_adapter():
    c = make(3, 40, 17, seed=3, lora=(1, 8))
    alpha = torch.tensor([0.7]).expand(3)  # stride 0, as ValveState.set_uniform gives
    y = cpu_linear(c["x"], c["weight"], None, c["lora_a"], c["lora_b"], alpha)
    assert_close(y, cpu_linear_ref(c["x"], c["weight"], None, c["lora_a"], c["lora_b"], alpha.contiguous()))


def test_out_and_threads():
    c = make(4, 100, 50, seed=4, bias=True)
    out = torch.full((4, 60), float("nan"))[:, :50]  # row stride 60
    for threads in (1, 2, 3):
        y = cpu_linear(**c, out=out, threads=threads)
        assert y is out
        assert_close(out, cpu_linear_ref(**c))


def test_pool_threads_chunks_and_concurrent_callers():
    """The work-claiming pool (csrc/work_pool.cpp): more threads than chunks, more threads
    than cores, and Python threads calling at once (one owns the pool, the others run
    alone) all give the reference result; workers are started once, not per call."""
    from concurrent.futures import ThreadPoolExecutor

    from cotrt import _cpu

    c = make(5, 64, 4099, seed=6, bias=True)  # N not a multiple of the 4-row block
    ref = cpu_linear_ref(**c)
    for threads in (1, 2, 7, 64):
        assert_close(cpu_linear(**c, threads=threads), ref, msg=f"threads={threads}")
    started = _cpu.workers()
    assert 1 <= started <= 63
    for _ in range(50):
        cpu_linear(**c, threads=7)
    assert _cpu.workers() == started

    cases = [make(1 + i % 8, 96, 1000 + 37 * i, seed=i, bias=i % 2 == 0) for i in range(12)]
    with ThreadPoolExecutor(4) as ex:
        outs = list(ex.map(lambda c: [cpu_linear(**c, threads=3) for _ in range(20)][-1], cases))
    for i, (c, y) in enumerate(zip(cases, outs)):
        assert_close(y, cpu_linear_ref(**c), msg=f"concurrent case {i}")


def test_pool_in_a_forked_child():
    """A forked child has none of the parent's pool threads: it starts its own and gets the
    reference result (no hang on the parent's copied state)."""
    import os

    c = make(3, 64, 2048, seed=8)
    cpu_linear(**c, threads=2)  # the parent's pool is running
    ref = cpu_linear_ref(**c)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        ok = b"0"
        try:
            ok = b"1" if torch.allclose(cpu_linear(**c, threads=2), ref, atol=1e-4) else b"0"
        finally:
            os.write(w, ok)
            os._exit(0)
    os.close(w)
    import select
    ready, _, _ = select.select([r], [], [], 120)
    got = os.read(r, 1) if ready else b"hang"
    if not ready:
        os.kill(pid, 9)
    os.waitpid(pid, 0)
    assert got == b"1"


@pytest.mark.parametrize("bad,match", [
    (dict(x=torch.zeros(2, 5)), "weight must be"),
    (dict(x=torch.zeros(2, 4, dtype=torch.float64), weight=torch.zeros(3, 4, dtype=torch.float64)), "weight dtype"),
    (dict(weight=torch.zeros(4, 3).t()), "contiguous"),
    (dict(x=torch.zeros(2, 4, dtype=torch.bfloat16)), "differs"),
    (dict(bias=torch.zeros(4)), "bias must be"),
    (dict(lora_a=torch.zeros(1, 2, 4)), "come together"),
    (dict(lora_a=torch.zeros(1, 2, 4), lora_b=torch.zeros(1, 3, 2), alpha=torch.zeros(3)), "alpha must be"),
    (dict(lora_a=torch.zeros(1, 2, 4), lora_b=torch.zeros(1, 3, 2), alpha=torch.zeros(2),
          adapter_idx=torch.zeros(2)), "adapter_idx must be"),
    (dict(lora_a=torch.zeros(1, 2, 4), lora_b=torch.zeros(1, 3, 3), alpha=torch.zeros(2)), "lora_b must be"),
    (dict(out=torch.zeros(3, 2)), "out must be"),
])
def test_bad_arguments_name_the_argument(bad, match):
    args = dict(x=torch.zeros(2, 4), weight=torch.zeros(3, 4))
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        cpu_linear(**args)


def test_portable_kernel_matches_reference():
    """The scalar fallback (what a CPU without AVX2/FMA runs), forced by COTRT_CPU_ISA."""
    import os
    import subprocess
    import sys

    code = """
import torch
from cotrt import _cpu
from cotrt.ops.cpu_linear import cpu_linear, cpu_linear_ref
assert _cpu.isa() == "scalar", _cpu.isa()
g = torch.Generator().manual_seed(0)
for dt in (torch.float32, torch.bfloat16):
    x, w, b = torch.randn(3, 37, generator=g), torch.randn(21, 37, generator=g) / 6, torch.randn(21, generator=g)
    a, lb = torch.randn(2, 4, 37, generator=g) / 6, torch.randn(21, 2, 4, generator=g).permute(1, 0, 2) / 2
    al, idx = torch.tensor([0.5, 0.0, -1.0]), torch.tensor([1, 0, -1], dtype=torch.int32)
    args = [t.to(dt) for t in (x, w, b, a)] + [lb.to(dt).permute(1, 0, 2).contiguous().permute(1, 0, 2), al, idx]
    err = (cpu_linear(*args).float() - cpu_linear_ref(*args)).abs().max().item()
    assert err < (1e-5 if dt == torch.float32 else 2e-2), (dt, err)
print("ok")
"""
    env = dict(os.environ, COTRT_CPU_ISA="scalar")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


# ------------------------------------------------------------------------- the module swap


def test_swap_runs_the_kernel_only_inside_cotrt_forwards(monkeypatch):
    from cotrt.layers import cpu_linear as cl

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8, bias=False))
    w0 = model[0].weight
    names = cl.swap_cpu_linears(model)
    assert names == ["0", "2"] and model[0].weight is w0 and isinstance(model[0], nn.Linear)
    calls = []
    real = cl._launch
    monkeypatch.setattr(cl, "_launch", lambda *a: calls.append(a[0].shape) or real(*a))
    x = torch.randn(3, 16)
    plain = model(x)
    assert calls == []  # outside CpuKernels: F.linear
    with cl.CpuKernels():
        fast = model(x)
        model(torch.randn(9, 16))  # more than MAX_ROWS rows: F.linear
    assert calls == [(3, 16), (3, 32)]
    assert_close(fast, plain)
    cl.unswap_cpu_linears(model)
    assert type(model[0]) is nn.Linear


def test_swap_leaves_tensor_subclass_weights_alone():
    """A weight that is a tensor subclass (a DTensor shard, a quantized weight) has no raw
    buffer for the kernel: that linear stays nn.Linear."""
    from cotrt.layers import cpu_linear as cl

    class Sub(torch.Tensor):
        pass

    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model[0].weight = nn.Parameter(torch.randn(4, 3).as_subclass(Sub))
    assert cl.swap_cpu_linears(model) == ["1"]
    assert type(model[0]) is nn.Linear


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_valve_linear_rides_the_kernel(monkeypatch, dtype):
    """A ValveLinear (mixed alphas, adapter -1) inside CpuKernels runs the kernel with its
    bank and matches the valve_lora path it takes outside."""
    from cotrt.layers import cpu_linear as cl
    from cotrt.valve import ValveLinear, ValveState

    torch.manual_seed(0)
    base = nn.Linear(96, 40).to(dtype)
    cl.swap_cpu_linears(nn.Sequential(base))  # a swapped linear is what ValveSet wraps
    state = ValveState()
    vl = ValveLinear(base, state)
    vl.set_adapter(0, torch.randn(8, 96) * 0.1, torch.randn(40, 8) * 0.1)
    vl.set_adapter(1, torch.randn(4, 96) * 0.1, torch.randn(40, 4) * 0.1)
    state.set_rows([0.0, 1.0, -1.5, 2.0], [0, 1, 0, -1])
    x = torch.randn(4, 1, 96).to(dtype)
    calls = []
    real = cl._launch
    monkeypatch.setattr(cl, "_launch", lambda *a: calls.append(a[3] is not None) or real(*a))
    slow = vl(x)
    assert calls == []
    with cl.CpuKernels():
        fast = vl(x)
        state.clear()
        plain = vl(x)
    assert calls == [True, False]
    assert_close(fast.float(), slow.float(), dtype=dtype)
    assert_close(plain.float(), F.linear(x, base.weight, base.bias).float(), dtype=dtype)


def test_wrap_decodes_like_hf_with_and_without_kernels(smol_model):
    """SmolLM2 greedy decoding with the kernels matches HF generate (tie-gap rule), and
    wrap(cpu_kernels=False) leaves the linears alone."""
    import cotrt
    from _parity import assert_greedy_match, hf_greedy
    from cotrt.layers.cpu_linear import CpuLinear

    model, tok = smol_model
    prompt = tok("The capital of France is", add_special_tokens=False)["input_ids"]
    ref = hf_greedy(model, prompt, 24)
    try:
        rt = cotrt.wrap(model, tok, max_batch=2, max_len=128, cpu_kernels=True)
        assert "cpu_linear" in rt.runner.fused
        assert isinstance(model.lm_head, CpuLinear)
        out = rt.generate([prompt], cotrt.Params(max_new_tokens=24))
        assert_greedy_match(model, prompt, out[0].token_ids, ref, "cpu_kernels")
        assert hf_greedy(model, prompt, 24) == ref  # HF generate on the swapped model: F.linear
    finally:
        from cotrt.layers.cpu_linear import unswap_cpu_linears
        unswap_cpu_linears(model)
    rt = cotrt.wrap(model, tok, max_batch=2, max_len=128, cpu_kernels=False)
    assert "cpu_linear" not in rt.runner.fused and type(model.lm_head) is nn.Linear


def test_wrap_refuses_a_bad_cpu_kernels_value(smol_model):
    import cotrt

    model, tok = smol_model
    with pytest.raises(ValueError, match="cpu_kernels"):
        cotrt.wrap(model, tok, cpu_kernels="yes")


@pytest.mark.parametrize("r", [16, 13, 3])
@pytest.mark.parametrize("threads", [1, 2])
def test_valve_shrink_paths(r, threads):
    """Both ways the kernel shrinks: every valve row on one adapter (the shrink runs as a
    weight [r, K] for all rows, then each row is scaled by its alpha), and rows on two
    adapters (one shrink per row); base-only rows (alpha 0, adapter -1) among them."""
    one = make(8, 576, 200, seed=r, bias=True, lora=(2, r))
    one["alpha"] = torch.tensor([0.5, 0.0, -1.25, 1.0, 2.0, 0.75, 0.0, 1.5])
    one["adapter_idx"] = torch.tensor([1, 1, 1, -1, 1, 1, 1, 1])
    two = dict(one, adapter_idx=torch.tensor([0, 1, 0, 1, 0, 1, -1, 1]))
    for c, name in ((one, "one adapter"), (two, "two adapters")):
        assert_close(cpu_linear(**c, threads=threads), cpu_linear_ref(**c), msg=f"{name}, r={r}, threads={threads}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lora", [None, (1, 16), (2, 8)])
def test_block_epilogue_matches_single_rows(dtype, lora):
    """A block of 4 weight rows sums, biases and stores its outputs as one vector (K and r
    multiples of 8, fp32 out; bf16 out takes the per-output path on both sides); a lone row
    does it an output at a time. The two must agree bit for bit: the vector sum keeps the
    scalar one's order."""
    M, N, K = 5, 12, 64
    c = make(M, K, N, dtype=dtype, seed=3, bias=True, lora=lora)
    full = cpu_linear(**c)
    for n in range(N):
        one = dict(c, weight=c["weight"][n:n + 1], bias=c["bias"][n:n + 1])
        if lora is not None:
            one["lora_b"] = c["lora_b"][:, n:n + 1]
        assert torch.equal(cpu_linear(**one)[:, 0], full[:, n]), f"row {n}"


def test_linear_repeat_is_the_same_call():
    """_cpu.linear_repeat (how bench_cpu_linear times the kernel without Python between
    calls) makes exactly linear()'s call, `repeats` times: same output; 0 repeats write nothing."""
    from cotrt.ops import cpu_linear as cl

    c = make(3, 64, 20, seed=5, bias=True, lora=(1, 16))
    want = cpu_linear(**c)
    y, xf, args = cl._kernel_args(c["x"], c["weight"], c["bias"], c["lora_a"], c["lora_b"], c["alpha"],
                                  c["adapter_idx"], torch.full((3, 20), 7.0), 0)
    cl._cpu.linear_repeat(*args, 0)
    assert torch.equal(y, torch.full((3, 20), 7.0))
    cl._cpu.linear_repeat(*args, 3)
    assert torch.equal(y, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("r", [16, 13])
@pytest.mark.parametrize("threads", [1, 2])
def test_valve_rows_on_one_adapter(dtype, r, threads):
    """Every row a valve row on one adapter (the usual valve, whose tiles take the shared-B
    expand without per-row checks) matches the reference, and each row's output is bit for
    bit what the same row gets beside a base-only row (the per-row path)."""
    M = 5
    c = make(M, 576, 200, dtype=dtype, seed=r, bias=True, lora=(2, r))
    c["alpha"] = torch.tensor([0.5, -1.25, 1.0, 2.0, 0.75])
    c["adapter_idx"] = torch.ones(M, dtype=torch.int64)
    y = cpu_linear(**c, threads=threads)
    if dtype == torch.float32:
        assert_close(y, cpu_linear_ref(**c), msg=f"r={r}")
    else:
        from cotrt.ops.valve_lora import valve_lora
        assert_flash_rule(y, cpu_linear_ref(**c), valve_lora(**c), msg=f"r={r}")
    mixed = dict(c, x=torch.cat([c["x"], c["x"][:1]]), alpha=torch.cat([c["alpha"], torch.zeros(1)]),
                 adapter_idx=torch.cat([c["adapter_idx"], torch.ones(1, dtype=torch.int64)]))
    assert torch.equal(cpu_linear(**mixed, threads=threads)[:M], y)


def test_linears_repeat_is_one_job_of_the_same_calls():
    """_cpu.linears_repeat (the bench's decoder-call rows) runs its linears (valves
    included) as one job: each output is the one its own linear() call gives; it takes 1 to
    4 calls of 21 arguments."""
    from cotrt.ops import cpu_linear as cl

    cs = [make(3, 64, n, seed=n, bias=True, lora=(1, 16)) for n in (20, 8, 8)]
    want = [cpu_linear(**c) for c in cs]
    outs = [cl._kernel_args(c["x"], c["weight"], c["bias"], c["lora_a"], c["lora_b"], c["alpha"],
                            c["adapter_idx"], None, 0) for c in cs]
    cl._cpu.linears_repeat([args for _, _, args in outs], 2)
    for (y, _, _), w in zip(outs, want):
        assert torch.equal(y, w)
    with pytest.raises(ValueError, match="1 to 4"):
        cl._cpu.linears_repeat([], 1)
    with pytest.raises(ValueError, match="21 arguments"):
        cl._cpu.linears_repeat([(1, 2)], 1)


def test_linears_sequence_runs_each_job_and_times_it():
    """_cpu.linears_sequence (the bench's decode-order rows) runs its jobs in order, each as
    linears_repeat would: every output is its own linear() call's; one time per job, > 0;
    0 repeats write nothing; bad jobs are refused by name."""
    from cotrt.ops import cpu_linear as cl

    cs = [make(2, 64, n, seed=n, bias=True, lora=(1, 16)) for n in (20, 8, 12)]
    want = [cpu_linear(**c) for c in cs]
    outs = [cl._kernel_args(c["x"], c["weight"], c["bias"], c["lora_a"], c["lora_b"], c["alpha"],
                            c["adapter_idx"], torch.full((2, c["weight"].shape[0]), 7.0), 0) for c in cs]
    jobs = [[outs[0][2], outs[1][2]], [outs[2][2]]]
    assert cl._cpu.linears_sequence(jobs, 0) == [0.0, 0.0]
    assert all(torch.equal(y, torch.full_like(y, 7.0)) for y, _, _ in outs)
    seconds = cl._cpu.linears_sequence(jobs, 3)
    assert len(seconds) == 2 and all(s > 0 for s in seconds)
    for (y, _, _), w in zip(outs, want):
        assert torch.equal(y, w)
    with pytest.raises(ValueError, match="linears_sequence: no jobs"):
        cl._cpu.linears_sequence([], 1)
    with pytest.raises(ValueError, match="linears_sequence: 1 to 4 calls"):
        cl._cpu.linears_sequence([[]], 1)
    with pytest.raises(ValueError, match="linears_sequence: each call is linear"):
        cl._cpu.linears_sequence([[(1, 2)]], 1)


def test_bench_step_jobs_do_the_work_they_name():
    """bench_cpu_linear's step section: each layer's calls have their own weights (so a
    step reads them from memory), both sides share them, and the valve side computes the
    valve (its outputs are the reference's with the LoRA term, the base side's without)."""
    import importlib.util
    from pathlib import Path

    from cotrt.ops import cpu_linear as cl

    path = Path(__file__).resolve().parents[2] / "bench" / "bench_cpu_linear.py"
    spec = importlib.util.spec_from_file_location("bench_cpu_linear", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    base, valve, names, keep = bench.step_jobs(2, torch.float32, layers=2)
    assert names == [n for n, _ in bench.CALLS[:-1]] * 2 + ["lm_head"]
    assert len({c[1] for job in base for c in job}) == sum(len(job) for job in base)  # own weights
    assert [c[1] for job in base for c in job] == [c[1] for job in valve for c in job]  # shared
    assert cl._cpu.linears_sequence(base, 1) and cl._cpu.linears_sequence(valve, 1)
    by_ptr = {t.data_ptr(): t for t in keep if t is not None}
    for jb, jv in zip(base, valve):
        for cb, cv in zip(jb, jv):
            x, w, b, a, lb, alpha = (by_ptr.get(p) for p in (cv[0], cv[1], cv[2], cv[3], cv[4], cv[5]))
            want = cpu_linear_ref(x, w, b, a, lb, alpha, None)
            plain = cpu_linear_ref(x, w, b)
            assert_close(by_ptr[cv[7]], want)
            assert_close(by_ptr[cb[7]], plain)
            assert not torch.allclose(want, plain, atol=1e-3)
