"""The op accounting dispatch mode on small meta ops: FLOPs by kind, bytes, kernels, live-memory peak, values."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from magi_server.runtime.accounting import OpAccountant, Roofline, Segment, repeat_segments, storage_bytes

META = "meta"


def meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device=META)


def test_mm_flops_and_gemm_kinds_by_operand_dtype():
    acc = OpAccountant()
    with acc:
        meta(64, 128, dtype=torch.bfloat16) @ meta(128, 32, dtype=torch.bfloat16)
        meta(64, 128) @ meta(128, 32)
        F.linear(meta(2, 3, 128, dtype=torch.bfloat16), meta(32, 128, dtype=torch.bfloat16),
                 meta(32, dtype=torch.bfloat16))  # 3-D input with bias: addmm over 6 rows
        torch.bmm(meta(4, 8, 16), meta(4, 16, 2))
    assert acc.total.flops["gemm_bf16"] == 2 * 64 * 128 * 32 + 2 * 6 * 128 * 32
    assert acc.total.flops["gemm_fp32"] == 2 * 64 * 128 * 32 + 2 * 4 * 8 * 16 * 2
    assert acc.total.flops["attention"] == 0


def test_bf16_operands_with_fp32_output_count_as_bf16_gemm():
    acc = OpAccountant()
    with acc:
        out = torch.mm(meta(16, 32, dtype=torch.bfloat16), meta(32, 8, dtype=torch.bfloat16), out_dtype=torch.float32)
    assert out.dtype == torch.float32
    assert acc.total.flops["gemm_bf16"] == 2 * 16 * 32 * 8 and acc.total.flops["gemm_fp32"] == 0


def test_scaled_mm_is_fp8_gemm():
    a = meta(32, 64, dtype=torch.float8_e4m3fn)
    b = meta(16, 64, dtype=torch.float8_e4m3fn).t()
    acc = OpAccountant()
    with acc:
        torch._scaled_mm(a, b, scale_a=meta(()), scale_b=meta(()), out_dtype=torch.bfloat16)
    assert acc.total.flops["gemm_fp8"] == 2 * 32 * 64 * 16


def test_conv_flops():
    acc = OpAccountant()
    with acc:
        F.conv3d(meta(1, 16, 6, 8, 8), meta(32, 16, 1, 2, 2), stride=(1, 2, 2))
    # output 1 x 32 x 6 x 4 x 4 elements, each 16 x 1 x 2 x 2 multiply-adds
    assert acc.total.flops["conv"] == 2 * (32 * 6 * 4 * 4) * (16 * 4)


@pytest.mark.parametrize("kv_heads", [8, 2])
def test_sdpa_is_one_fused_attention_op_on_meta(kv_heads):
    b, hq, sq, sk, d = 1, 8, 100, 300, 64
    q = meta(b, hq, sq, d, dtype=torch.bfloat16)
    k = meta(b, kv_heads, sk, d, dtype=torch.bfloat16)
    acc = OpAccountant(by_op=True)
    with acc:
        out = F.scaled_dot_product_attention(q, k, k, enable_gqa=kv_heads != hq)
    assert out.shape == q.shape
    assert acc.total.flops["attention"] == 4 * b * hq * sq * sk * d
    assert acc.total.flops["gemm_fp32"] == acc.total.flops["gemm_bf16"] == 0
    # no (Sq x Sk) score matrix is materialised: the peak is q, k, the output and the fp32 log-sum-exp
    assert acc.peak_bytes <= 3 * q.numel() * 2 + b * hq * sq * 4 + 1024
    assert not any(name in acc.by_op for name in ("aten::bmm", "aten::_safe_softmax"))


def test_peak_of_a_known_alloc_free_sequence_with_a_baseline():
    weights = meta(250)  # 1000 bytes that exist before the mode
    acc = OpAccountant()
    acc.track([weights, weights.view(5, 50)])  # the same storage twice counts once
    assert acc.live_bytes == 1000
    with acc:
        with acc.phase("first"):
            a = meta(250)  # +1000
            b = meta(500)  # +2000 -> 4000
            view = b.view(10, 50)  # a view: no new memory
            del a  # -> 3000
        with acc.phase("second"):
            c = meta(100)  # +400 -> 3400
    assert acc.peak_bytes == 4000
    assert acc.phases["first"].peak_bytes == 4000 and acc.phases["first"].start_bytes == 1000
    assert acc.phases["second"].peak_bytes == 3400
    assert acc.live_bytes == 3400
    del b
    assert acc.live_bytes == 3400  # `view` still holds b's storage
    del view, c
    assert acc.live_bytes == 1000


def test_kernels_exclude_views_and_allocations_and_bytes_are_reads_plus_writes():
    acc = OpAccountant()
    x = meta(10, 10)
    y = meta(10, 10)
    acc.track([x, y])
    with acc:
        x.t()
        x.view(100)
        x[2:5]
        torch.empty(3, device=META)
        assert acc.total.kernels == 0 and acc.total.bytes == 0
        x + y
    assert acc.total.kernels == 1
    assert acc.total.bytes == 3 * 400  # two inputs read, one output written


def test_broadcast_inputs_count_their_real_size():
    acc = OpAccountant()
    row = meta(1, 100)
    with acc:
        meta(50, 100) * row.expand(50, 100)
    assert acc.total.bytes == 50 * 100 * 4 + 100 * 4 + 50 * 100 * 4


def test_roofline_takes_the_slower_of_compute_and_bandwidth():
    gpu = Roofline("test", bf16_flops=1e12, fp8_flops=2e12, fp32_flops=1e11, tf32_flops=5e11, bandwidth=1e9)
    acc = OpAccountant(rooflines=[gpu])
    with acc:
        meta(1000, 1000, dtype=torch.bfloat16) @ meta(1000, 1000, dtype=torch.bfloat16)
    flops, nbytes = 2e9, 3 * 1000 * 1000 * 2
    assert acc.total.seconds["test"] == pytest.approx(max(flops / 1e12, nbytes / 1e9))
    acc32 = OpAccountant(rooflines=[gpu])
    with acc32:
        meta(1000, 1000) @ meta(1000, 1000)
    assert acc32.total.seconds["test"] == pytest.approx(max(2e9 / 1e11, 3 * 1000 * 1000 * 4 / 1e9))


def test_small_tensors_keep_their_values_on_meta():
    acc = OpAccountant()
    mask = torch.zeros(2, 8, dtype=torch.int64)
    mask[0, :3] = 1
    mask[1, :5] = 1
    with acc:
        m = mask.to(META) != 0
        rows = meta(2, 8, 4)[m]  # boolean indexing: a data-dependent shape
        counts = m.sum(dim=1)
        assert rows.shape == (8, 4) and rows.device.type == META
        assert counts.tolist() == [3, 5]
        assert counts[1].item() == 5
        picked = m[[1, 1, 0]]  # a Python index list keeps its values
        assert picked.sum().item() == 13
        t = torch.tensor([0.25, 0.5]).to(META)
        assert float(t[1] * 2) == 1.0


def test_a_meta_tensor_without_values_cannot_be_read():
    acc = OpAccountant()
    with acc, pytest.raises(RuntimeError, match="unknown"):
        meta(3).sum().item()


def test_repeat_segments_extrapolates_a_layer_stack():
    # two layers, the second repeated twice more: each copy writes 10 bytes of cache and peaks 100 above its start
    segs = [
        Segment(("f",), 0, 5, 0),
        Segment(("f", "layer.0"), 0, 100, 10),
        Segment(("f", "layer.mid"), 10, 110, 20),
        Segment(("f",), 20, 50, 20),
    ]
    segs[1].stats.flops["gemm_bf16"] = 7
    segs[2].stats.flops["gemm_bf16"] = 7
    stats, peak, end = repeat_segments(segs, {"layer.mid": 2})
    assert stats.flops["gemm_bf16"] == 7 * 4
    assert peak == 110 + 2 * 10 and end == 20 + 2 * 10


def test_storage_bytes_counts_shared_storage_once():
    x = meta(10, 10)
    assert storage_bytes([x, x[0], x.t()]) == 400


def test_host_tensors_leave_the_device_total():
    acc = OpAccountant()
    with acc:
        rows = meta(100)  # 400 bytes on the device
        host = rows.clone()  # +400, then declared host memory (an offloaded copy)
        assert acc.live_bytes == 800
        acc.mark_host(host)
        assert acc.live_bytes == 400
        host[:10]  # views of it are not counted either
        host.view(10, 10).clone()  # a device copy of it is
        assert acc.live_bytes == 400  # the clone died at once
    assert acc.peak_bytes == 800
