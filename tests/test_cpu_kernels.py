"""The C kernels (consumer/cpu_kernels.c): equal to torch on any input, and built safely —
or not at all, with the pure-torch path taking over."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from saestream.consumer import cpu_kernels

SPECIAL = [0.0, -0.0, 1.0, -1.0, 2.5, float("inf"), float("-inf"), float("nan"), 3e38, -3e38]


@pytest.fixture(autouse=True)
def _built() -> None:
    assert cpu_kernels.load() is not None, "the C kernels did not build (is cc installed?)"


def check_topk(pre: torch.Tensor, k: int, bias: torch.Tensor | None) -> None:
    """The top k, and the columns gathered beside it (AuxK's dead latents), in rows and in
    columns, equal torch's bit for bit."""
    batch, n = pre.shape
    cols = torch.arange(n - 1, -1, -3).flip(0)  # every third column, the last one included
    by_row, by_column = torch.full((batch, len(cols)), 7.0), torch.full((len(cols), batch), 7.0)
    for out in (by_row, by_column.t()):
        got = cpu_kernels.topk_rows(pre, k, bias=bias, gather=(cols, out))
        assert got is not None
    values, indices = got
    full = pre if bias is None else pre + bias
    for out in (by_row, by_column.t()):
        torch.testing.assert_close(out, full[:, cols], rtol=0, atol=0, equal_nan=True)
    ref = full.topk(k, dim=1, sorted=True).values
    assert values.shape == indices.shape == (pre.shape[0], k) and indices.dtype == torch.int64
    torch.testing.assert_close(values, ref, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(full.gather(1, indices), values, rtol=0, atol=0, equal_nan=True)
    assert all(len(set(row)) == k for row in indices.tolist())  # distinct columns per row


@settings(max_examples=300, deadline=None)
@given(
    batch=st.integers(0, 40),
    n=st.integers(1, 300),
    k_frac=st.floats(0, 1),
    special=st.floats(0, 1),
    use_bias=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_topk_equals_torch_on_hostile_rows(batch, n, k_frac, special, use_bias, seed) -> None:
    """Any width, any k, ties, ±inf, ±0, NaN (in the values or made by the bias: inf − inf)."""
    g = torch.Generator().manual_seed(seed)
    k = max(1, min(n, round(k_frac * n)))
    pre = torch.randn(batch, n, generator=g).mul_(4).round_()  # many ties
    specials = torch.tensor(SPECIAL)
    mask = torch.rand(batch, n, generator=g) < special * 0.2
    pre[mask] = specials[torch.randint(len(SPECIAL), (int(mask.sum()),), generator=g)]
    bias = None
    if use_bias:
        bias = torch.randn(n, generator=g)
        bias[torch.rand(n, generator=g) < special * 0.1] = float("inf")
    check_topk(pre, k, bias)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape,k", [((1024, 4096), 32), ((300, 1000), 128), ((64, 4100), 1)])
def test_topk_with_bias_on_torch_threads(shape, k, threads) -> None:
    """Rows split over torch's OpenMP threads; NaN rows in the middle go to torch."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        pre = torch.randn(*shape)
        pre[shape[0] // 2, 7] = float("nan")
        check_topk(pre, k, torch.randn(shape[1]))
        check_topk(pre, k, None)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("n", [4096, 4111])
@pytest.mark.parametrize("k", [1, 32, 200])
def test_topk_of_wide_rows_with_few_and_with_many_candidates(n, k) -> None:
    """Both ways the kernel orders the candidates above its threshold: by counting (few,
    as on random rows) and by quickselect (many: rows of ties, a constant row, a row where
    the bias makes most columns equal), over widths with and without a partial vector."""
    g = torch.Generator().manual_seed(n + k)
    pre = torch.randn(6, n, generator=g)
    pre[1] = pre[1].mul(2).round()  # a few values, each thousands of times
    pre[2] = 0.0  # every column a candidate
    pre[3, ::3] = float("inf")
    pre[4] = -pre[4].abs()
    for bias in (None, torch.randn(n, generator=g), -pre[5].clone()):
        check_topk(pre, k, bias)


@pytest.mark.parametrize("batch,k,n", [(0, 3, 5), (1, 1, 1), (37, 5, 11), (1024, 32, 4096)])
def test_csr_pattern_equals_a_stable_argsort(batch, k, n) -> None:
    """The counting sort gives the very arrays of torch's stable argsort, bincount and
    cumsum, repeated ids in a row included; ids out of range are declined."""
    g = torch.Generator().manual_seed(batch + k + n)
    ids = torch.randint(n, (batch, k), generator=g)
    got = cpu_kernels.csr_pattern(ids, n)
    assert got is not None
    crow, cols, order = got
    flat = ids.reshape(-1)
    ref_order = torch.argsort(flat, stable=True)
    ref_crow = torch.zeros(n + 1, dtype=torch.int64)
    torch.cumsum(torch.bincount(flat, minlength=n), 0, out=ref_crow[1:])
    assert torch.equal(order, ref_order) and torch.equal(crow, ref_crow)
    assert torch.equal(cols, torch.div(ref_order, k, rounding_mode="floor"))
    if batch:
        for bad in (-1, n):
            hostile = ids.clone()
            hostile[batch // 2, k - 1] = bad
            assert cpu_kernels.csr_pattern(hostile, n) is None
    assert cpu_kernels.csr_pattern(ids.to(torch.int32), n) is None
    assert cpu_kernels.csr_pattern(ids[:, :0], n) is None


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("batch,k,n,d", [(1, 1, 1, 1), (37, 5, 11, 7), (256, 32, 1024, 96)])
def test_csr_backward_equals_torchs_sparse_products(batch, k, n, d, threads) -> None:
    """∂W (written, and added into a given one) and the gathered dot products equal torch's
    sparse × dense and sampled products over the same pattern, up to rounding."""
    from saestream.consumer.sparse_ops import LatentPattern, gathered_dot, spmm

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(batch * k + n)
        ids = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(batch)])
        coef, rows = torch.randn(batch, k, generator=g), torch.randn(batch, d, generator=g)
        W, acc = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
        pattern = LatentPattern(ids, n)
        S, _ = pattern.matrix(coef)
        want_W = spmm(S, rows)
        want_v = gathered_dot(ids, W, rows, pattern.matrix(torch.ones(batch, k)))
        got = cpu_kernels.csr_backward(pattern.arrays(), coef, rows, W)
        assert got is not None
        torch.testing.assert_close(got[0], want_W)
        torch.testing.assert_close(got[1], want_v)
        into = acc.clone()
        got_W, no_v = cpu_kernels.csr_backward(pattern.arrays(), coef, rows, None, into)
        assert got_W is into and no_v is None
        torch.testing.assert_close(into, acc + want_W)
        no_W, only_v = cpu_kernels.csr_backward(pattern.arrays(), None, rows, W)
        assert no_W is None
        torch.testing.assert_close(only_v, want_v)
    finally:
        torch.set_num_threads(before)
    arrays = pattern.arrays()
    for declined in (
        (arrays, None, rows, None),  # nothing asked
        (arrays, coef.double(), rows, W),
        (arrays, coef, rows, W[:, :-1] if d > 1 else W[:-1]),
        (arrays, coef[:, :-1] if k > 1 else coef[:0], rows, W),
        (arrays, coef, rows, W, acc.t() if n != d else acc[:, :0]),
        (tuple(t.to(torch.int32) for t in arrays), coef, rows, W),
        (arrays, coef, rows[:0], W),
    ):
        assert cpu_kernels.csr_backward(*declined) is None


@pytest.mark.parametrize(
    "shape,threads,eps", [((1, 1), 1, 6.25e-10), ((37, 5), 1, 1e-2), ((300, 96), 2, 6.25e-10)]
)
def test_decoder_adam_equals_projection_then_torch_adam_then_renormalisation(
    shape, threads, eps, monkeypatch
) -> None:
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)  # the kernel's thread count
    g = torch.Generator().manual_seed(1)
    W = torch.randn(*shape, generator=g)
    W /= W.norm(dim=1, keepdim=True)
    ref = torch.nn.Parameter(W.clone())
    opt = torch.optim.Adam([ref], lr=3e-3, betas=(0.9, 0.999), eps=eps, fused=True)
    m, v = torch.zeros(shape), torch.zeros(shape)
    for step in range(1, 8):
        grad = torch.randn(*shape, generator=g) * 10.0 ** -(step % 4)
        with torch.no_grad():
            ref.grad = grad - (grad * ref).sum(dim=1, keepdim=True) * ref
            opt.step()
            ref.div_(ref.norm(dim=1, keepdim=True).clamp_min(1e-12))
        kept = grad.clone()
        assert cpu_kernels.decoder_adam_(
            W, grad, m, v, lr=3e-3, betas=(0.9, 0.999), eps=eps, step=float(step)
        )
        assert torch.equal(grad, kept)  # the gradient is read, not written
        torch.testing.assert_close(W, ref.detach(), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(m, opt.state[ref]["exp_avg"], rtol=1e-3, atol=1e-7)
        torch.testing.assert_close(v, opt.state[ref]["exp_avg_sq"], rtol=1e-3, atol=1e-10)


@pytest.mark.parametrize("shape,threads", [((1, 1), 1), ((5, 3), 2), ((300, 96), 2), ((64, 7), 1)])
def test_loss_stats_equal_torchs_float64_sums(shape, threads, monkeypatch) -> None:
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    g = torch.Generator().manual_seed(2)
    xn = torch.randn(*shape, generator=g) * 3 + 1
    x_hat = xn + torch.randn(*shape, generator=g) * 0.1
    e, e_sum, sse, xn_sum, xn_sq = cpu_kernels.loss_stats(xn, x_hat)
    ref = xn - x_hat
    assert torch.equal(e, ref)
    assert e_sum.dtype == xn_sum.dtype == sse.dtype == xn_sq.dtype == torch.float64
    torch.testing.assert_close(e_sum, ref.double().sum(dim=0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sse, ref.double().pow(2).sum(), rtol=1e-12, atol=0.0)
    torch.testing.assert_close(xn_sum, xn.double().sum(dim=0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(xn_sq, xn.double().pow(2).sum(), rtol=1e-12, atol=0.0)
    if shape[0] > 1:  # a NaN or an infinity spoils the sums it enters, as in torch
        x_hat[1, 0] = float("nan")
        xn[0, -1] = float("inf")
        e, e_sum, sse, xn_sum, xn_sq = cpu_kernels.loss_stats(xn, x_hat)
        assert e_sum[0].isnan() and sse.isnan() and xn_sum[-1].isinf() and xn_sq.isinf()
        assert e_sum[1:-1].isfinite().all() and e[1:, 1:].isfinite().all()


def test_loss_stats_declines_what_it_does_not_take() -> None:
    x = torch.randn(4, 3)
    assert cpu_kernels.loss_stats(x.double(), x.double()) is None
    assert cpu_kernels.loss_stats(x, x[:2]) is None
    assert cpu_kernels.loss_stats(x[0], x[0]) is None


def test_decoder_adam_declines_what_it_does_not_take() -> None:
    W, z = torch.randn(8, 4), torch.zeros(8, 4)
    kw = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, step=1.0)
    assert not cpu_kernels.decoder_adam_(W.double(), z.double(), z.double(), z.double(), **kw)
    assert not cpu_kernels.decoder_adam_(W, z[:4], z, z, **kw)
    assert not cpu_kernels.decoder_adam_(W.t(), z.t(), z.t(), z.t(), **kw)  # not contiguous
    assert not cpu_kernels.decoder_adam_(W[0], z[0], z[0], z[0], **kw)
    assert torch.equal(z, torch.zeros(8, 4))


def test_inputs_the_kernel_does_not_take_are_declined() -> None:
    x = torch.randn(8, 64)
    assert cpu_kernels.topk_rows(x.double(), 4) is None
    assert cpu_kernels.topk_rows(x.bfloat16(), 4) is None
    assert cpu_kernels.topk_rows(x[0], 4) is None
    assert cpu_kernels.topk_rows(x, 0) is None and cpu_kernels.topk_rows(x, 65) is None
    assert cpu_kernels.topk_rows(x, 4, bias=torch.randn(63)) is None
    cols, out = torch.tensor([0, 5, 63]), torch.empty(x.shape[0], 3)
    for bad_cols, bad_out in ((torch.tensor([0, 5, 64]), out), (torch.tensor([-1, 5, 6]), out),
                              (cols.int(), out), (cols, out.double()), (cols, out[:, :2]),
                              (cols.view(3, 1), out)):
        assert cpu_kernels.topk_rows(x, 4, gather=(bad_cols, bad_out)) is None
    assert cpu_kernels.topk_rows(x, 4, gather=(cols, out)) is not None
    values, _ = cpu_kernels.topk_rows(x.t().contiguous().t(), 4)  # strided input: copied
    assert torch.equal(values, x.topk(4, dim=1).values)


def run_python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


PROBE = """
    import logging, torch
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    from saestream.consumer import cpu_kernels
    from saestream.consumer.sparse_ops import topk_rows
    lib = cpu_kernels.load()
    print("native" if lib is not None else "torch ops")
    pre = torch.randn(64, 4096)
    assert torch.equal(topk_rows(pre, 32)[0], pre.topk(32, dim=1).values)
    print(cpu_kernels.library_path() or "")
"""


def test_without_a_compiler_the_torch_path_runs_with_one_warning(tmp_path: Path) -> None:
    for cc in ("/bin/false", str(tmp_path / "no-such-cc")):
        proc = run_python(PROBE, {"CC": cc, "SAESTREAM_CACHE": str(tmp_path / "cache")})
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.splitlines()[0] == "torch ops"
        warnings = [ln for ln in proc.stderr.splitlines() if ln.startswith("WARNING")]
        assert len(warnings) == 1 and "fall" in warnings[0], proc.stderr


def test_saestream_native_0_turns_the_kernels_off(tmp_path: Path) -> None:
    proc = run_python(PROBE, {"SAESTREAM_NATIVE": "0", "SAESTREAM_CACHE": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "torch ops" and "WARNING" not in proc.stderr
    assert not list(tmp_path.rglob("*.so"))  # nothing built


@pytest.mark.parametrize("open_to_others", ["cache root", "kernels folder"])
def test_a_cache_folder_others_may_write_is_never_used(tmp_path: Path, open_to_others) -> None:
    """A shared object in a folder another user can write could be theirs: build elsewhere,
    in a private folder of this user's. A cache root open to others is harmless: the
    kernels folder in it is made 0700, and used through the descriptor that was checked."""
    shared = tmp_path / "shared"
    shared.mkdir()
    if open_to_others == "cache root":
        shared.chmod(0o777)
    else:
        (shared / "kernels").mkdir()
        (shared / "kernels").chmod(0o777)
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    env = {"SAESTREAM_CACHE": str(shared), "TMPDIR": str(private_tmp)}
    proc = run_python(PROBE, env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "native"
    built = Path(proc.stdout.splitlines()[1])
    if open_to_others == "cache root":
        assert built.parent == shared / "kernels"
    else:
        assert built.parent == private_tmp / f"saestream-kernels-{os.getuid()}"
        assert not [p for p in shared.rglob("*") if p.is_file()]
    assert built.parent.stat().st_mode & 0o777 == 0o700


def test_a_symlinked_cache_folder_is_never_used(tmp_path: Path) -> None:
    """The folder is checked and used through one descriptor: a symlink in its place (which
    could be re-pointed between a check and a load) is refused, whatever it points at."""
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o700)
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "kernels").symlink_to(mine)
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    env = {"SAESTREAM_CACHE": str(tmp_path / "root"), "TMPDIR": str(private_tmp)}
    proc = run_python(PROBE, env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "native"
    user_tmp = private_tmp / f"saestream-kernels-{os.getuid()}"
    assert Path(proc.stdout.splitlines()[1]).parent == user_tmp
    assert not list(mine.iterdir())


def test_when_no_cache_folder_is_usable_a_private_scratch_folder_is(tmp_path: Path) -> None:
    """Another user may own $TMPDIR/saestream-kernels-<uid> already: still no fallback."""
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "kernels").mkdir(mode=0o777)
    (tmp_path / "root" / "kernels").chmod(0o777)
    private_tmp = tmp_path / "tmp"
    (private_tmp / f"saestream-kernels-{os.getuid()}").mkdir(parents=True)
    (private_tmp / f"saestream-kernels-{os.getuid()}").chmod(0o777)
    env = {"SAESTREAM_CACHE": str(tmp_path / "root"), "TMPDIR": str(private_tmp)}
    proc = run_python(PROBE, env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "native"
    used = Path(proc.stdout.splitlines()[1]).parent
    assert used.parent == private_tmp and used.name.startswith("saestream-kernels-")
    assert not used.exists()  # used once, removed; the loaded copy stays mapped
    assert not [p for p in tmp_path.rglob("*.so")]


def test_umask_002_still_caches_in_the_cache_root(tmp_path: Path) -> None:
    """A group-writable cache root (user-private groups) does not matter: the kernels folder
    itself is made 0700 and used through its descriptor."""
    code = "import os; os.umask(0o002)\n" + textwrap.dedent(PROBE)
    proc = run_python(code, {"SAESTREAM_CACHE": str(tmp_path / "root")})
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.splitlines()[1]).parent == tmp_path / "root" / "kernels"
    assert (tmp_path / "root" / "kernels").stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize("damage", ["garbage", "another library"])
def test_a_damaged_cached_build_is_built_again(tmp_path: Path, damage: str) -> None:
    env = {"SAESTREAM_CACHE": str(tmp_path)}
    first = run_python(PROBE, env)
    assert first.returncode == 0, first.stderr
    built = Path(first.stdout.splitlines()[1])
    if damage == "garbage":
        built.write_bytes(b"\x7fELF not really")
    else:  # a real shared object without our symbols
        import ctypes.util

        libm = Path(ctypes.util.find_library("m") or "libm.so.6")
        libm = libm if libm.is_absolute() else Path("/lib/x86_64-linux-gnu") / libm
        if not libm.exists():
            pytest.skip("no libm file to copy")
        built.write_bytes(libm.read_bytes())
    again = run_python(PROBE, env)
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines()[0] == "native"
    assert "building them again" in again.stderr
    assert Path(again.stdout.splitlines()[1]) == built
    assert run_python(PROBE, env).stderr.count("WARNING") == 0  # rebuilt for good


def test_cc_with_arguments_builds(tmp_path: Path) -> None:
    proc = run_python(PROBE, {"CC": "cc -O2 -g0", "SAESTREAM_CACHE": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "native" and "WARNING" not in proc.stderr


def test_concurrent_first_builds_share_one_cache(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    env = {**os.environ, "SAESTREAM_CACHE": str(cache)}
    procs = [
        subprocess.Popen([sys.executable, "-c", textwrap.dedent(PROBE)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]  # fmt: skip
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert all(out.splitlines()[0] == "native" for out, _ in outs)
    files = sorted(f.name for f in (cache / "kernels").iterdir())
    assert len(files) == 1 and files[0].endswith(".so"), files  # no temporaries left


@pytest.mark.parametrize("isa", [[], ["-mavx2", "-mfma"]], ids=["portable C", "AVX2"])
def test_the_builds_for_other_cpus_give_the_same_results(isa, monkeypatch, tmp_path) -> None:
    """The kernels' paths for CPUs without AVX-512 (built here with those flags alone, as a
    build for another machine would be): top-k, the CSR pattern and the backward products
    equal torch's as the AVX-512 build's do."""
    from saestream.common import native
    from saestream.consumer.sparse_ops import LatentPattern, gathered_dot, spmm

    monkeypatch.setenv("SAESTREAM_CACHE", str(tmp_path))
    flags = ["-O3", "-fno-math-errno", "-fPIC", "-shared", "-fopenmp", *isa]
    lib = native.NativeLibrary(cpu_kernels.SOURCE, [flags], cpu_kernels._bind,
                               what="CPU kernels", fallback="torch ops")
    monkeypatch.setattr(cpu_kernels, "_LIBRARY", lib)
    assert cpu_kernels.load() is lib.load() is not None
    g = torch.Generator().manual_seed(5)
    pre = torch.randn(40, 4111, generator=g)
    pre[1] = pre[1].round()
    pre[2] = 0.0
    pre[3, 9] = float("nan")
    for k in (1, 32, 300):
        check_topk(pre, k, None)
        check_topk(pre, k, torch.randn(4111, generator=g))
    ids = torch.stack([torch.randperm(300, generator=g)[:16] for _ in range(50)])
    coef, rows = torch.randn(50, 16, generator=g), torch.randn(50, 100, generator=g)
    W = torch.randn(300, 100, generator=g)
    pattern = LatentPattern(ids, 300)
    got_W, got_v = cpu_kernels.csr_backward(pattern.arrays(), coef, rows, W)
    torch.testing.assert_close(got_W, spmm(pattern.matrix(coef)[0], rows))
    torch.testing.assert_close(got_v, gathered_dot(ids, W, rows))


def torch_layer_norm(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, ...]:
    """`SparseAutoencoder.normalize`'s torch path, in float64."""
    x = x.double()
    mu = x.mean(dim=1, keepdim=True)
    sd = (x - mu).pow(2).sum(dim=1, keepdim=True).div(x.shape[1] - 1).sqrt()
    return (x - mu) / (sd + eps), mu, sd


@pytest.mark.parametrize("shape,threads", [((1, 2), 1), ((5, 3), 2), ((300, 96), 2),
                                           ((64, 777), 1), ((0, 8), 1)])
def test_layer_norm_equals_torchs(shape, threads, monkeypatch) -> None:
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(*shape, generator=g) * 5 + 2
    if shape[0] > 2:
        x[1] = 7.0  # a constant row: deviation 0, divided by eps alone
        x[2] *= 1e25  # squares beyond float32: the float64 sums keep the deviation finite
    y, mu, sd = cpu_kernels.layer_norm(x, 1e-5)
    ry, rmu, rsd = torch_layer_norm(x, 1e-5)
    assert y.shape == x.shape and mu.shape == sd.shape == (shape[0], 1)
    torch.testing.assert_close(mu, rmu.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sd, rsd.float(), rtol=1e-5, atol=0.0)
    torch.testing.assert_close(y, ry.float(), rtol=1e-5, atol=1e-5)
    if shape[0] > 2:
        assert torch.equal(y[1], torch.zeros(shape[1])) and y[2].isfinite().all()


def test_layer_norm_declines_what_it_does_not_take() -> None:
    x = torch.randn(4, 3)
    assert cpu_kernels.layer_norm(x.double(), 1e-5) is None
    assert cpu_kernels.layer_norm(x[:, :1], 1e-5) is None  # one value has no deviation
    assert cpu_kernels.layer_norm(x[0], 1e-5) is None
    assert cpu_kernels.layer_norm(x.requires_grad_(), 1e-5) is None  # torch's path differentiates
