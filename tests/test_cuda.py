"""What only a GPU can check: the sparse path against the dense reference on CUDA, bf16
autocast, a CUDA trainer against the CPU one, a producer whose model runs on CUDA
(device-side regrouping, pinned copies) against the same producer on the CPU, and the
consumer's page-locked batches. Skipped
without CUDA; `benchmarks/gpu_check.sh` runs them wherever a GPU is."""

from __future__ import annotations

import pytest
import torch
from test_producer import collect_run, tiny_cfg

from saestream.consumer.sae import SAEConfig, SparseAutoencoder
from saestream.consumer.trainer import Trainer, TrainerConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def sample(n: int = 1024, d: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * torch.rand(d, generator=g) * 4


@pytest.mark.parametrize("multi_topk", [False, True])
def test_sparse_path_equals_dense_reference_on_cuda(multi_topk: bool) -> None:
    cfg = SAEConfig(d_in=64, n_latents=1024, k=16, multi_topk=multi_topk)
    sae = SparseAutoencoder(cfg, generator=torch.Generator().manual_seed(1)).cuda()
    x = sample().cuda()
    dead = torch.zeros(1024, dtype=torch.bool, device="cuda")
    dead[::7] = True
    results = []
    for dense in (False, True):
        sae.zero_grad(set_to_none=True)
        out = sae(x, dead, k_aux=32, dense=dense)
        loss = (out.normalized_x_hat - out.normalized_x).pow(2).sum() + out.auxk_recon.pow(2).sum()
        if out.multi_topk_x_hat is not None:
            loss = loss + out.multi_topk_x_hat.pow(2).sum() / 8
        loss.backward()
        results.append((out.x_hat.detach(), [p.grad.clone() for p in sae.parameters()]))
    (xs, gs), (xd, gd) = results
    torch.testing.assert_close(xs, xd, rtol=1e-4, atol=1e-4)
    for a, b in zip(gs, gd, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def train(device: str, steps: int = 4, **kw: object) -> Trainer:
    t = Trainer(SAEConfig(d_in=64, n_latents=512, k=8), TrainerConfig(dead_tokens=2048, **kw),
                name="s", hook="h", device=device)
    for i in range(steps):
        t.train_step(sample(seed=i))
    return t


def test_cuda_trainer_follows_the_cpu_trainer() -> None:
    cpu, gpu = train("cpu"), train("cuda")
    for a, b in zip(cpu.sae.parameters(), gpu.sae.parameters(), strict=True):
        torch.testing.assert_close(b.detach().cpu(), a.detach(), rtol=1e-3, atol=1e-4)
    assert torch.equal(cpu.tokens_since_fired, gpu.tokens_since_fired.cpu())


def test_bf16_autocast_trains_close_to_fp32() -> None:
    fp32, bf16 = train("cuda", steps=20), train("cuda", steps=20, autocast_bf16=True)
    x = sample(seed=99).cuda()
    m32 = fp32.train_step(x).normalized_mse
    m16 = bf16.train_step(x).normalized_mse
    assert m16 == pytest.approx(m32, rel=0.05)


def test_producer_on_cuda_sends_what_the_cpu_producer_sends(free_port: int) -> None:
    """Same model, float32 on both devices: the chunks agree to bf16 rounding, in order."""
    kw = dict(max_tokens=600, model_dtype="float32", codec="lz4-shuffle", encode_threads=2)
    on_cpu, _ = collect_run(tiny_cfg(free_port, device="cpu", **kw), free_port)
    on_gpu, result = collect_run(tiny_cfg(free_port, device="cuda", **kw), free_port)
    assert result["summary"].complete
    assert [c.seq for c in on_gpu] == list(range(len(on_gpu)))
    assert [c.source for c in on_gpu] == [c.source for c in on_cpu]
    for a, b in zip(on_cpu, on_gpu, strict=True):
        torch.testing.assert_close(b.acts.float(), a.acts.float(), rtol=2e-2, atol=2e-2)


def test_pinned_buffer_hands_out_pinned_batches_that_copy_asynchronously() -> None:
    """The consumer's `pin_memory` buffer: each batch is page-locked, so the trainer's
    non_blocking copy returns before the copy is done; it holds the rows an unpinned buffer
    with the same seed hands out; freeing a batch while its copy is pending corrupts nothing
    (the next batches are gathered meanwhile); the buffer itself stays pageable."""
    from saestream.consumer.buffer import ShuffleBuffer

    rows = torch.arange(4096 * 8, dtype=torch.float32).view(4096, 8)
    pinned = ShuffleBuffer(4096, 8, torch.float32, pin_memory=True, seed=3)
    plain = ShuffleBuffer(4096, 8, torch.float32, seed=3)
    for buf in (pinned, plain):
        buf.put(rows)
    assert not pinned.data.is_pinned()
    stream = torch.cuda.current_stream()
    torch.cuda._sleep(200_000_000)  # keeps every copy below pending for ~0.1 s
    copies = []
    for _ in range(4):
        a, b = pinned.take(1024), plain.take(1024)
        assert a is not None and b is not None
        assert a.x.is_pinned() and not b.x.is_pinned()
        assert torch.equal(a.x, b.x) and torch.equal(a.sources, b.sources)
        copies.append((a.x.to("cuda", non_blocking=True), b.x.clone()))
        assert not stream.query()  # the copy is queued behind the sleep: the host went on
        del a  # the pinned block goes back to the allocator while its copy is pending
    torch.cuda.synchronize()
    for on_gpu, expected in copies:
        assert torch.equal(on_gpu.cpu(), expected)
