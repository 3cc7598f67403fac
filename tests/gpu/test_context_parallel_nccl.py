"""Context parallelism over NCCL (one rank per GPU) gives the single-GPU DiT forward (#11, 6): the calls of
tests/test_context_parallel.py (padding, a batched KV-cache write and read) in float32, within the golden README's
float32 bound. Needs 2 or more GPUs (4 for the 4-rank case)."""
from __future__ import annotations

import pytest
import torch

from magi_server.runtime.context_parallel import init_context_parallel, loopback_init_method
from tests.test_context_parallel import _assert_float32_bound, _dit, _dit_calls, _run_ranks


def _nccl_rank(rank: int, size: int, init_method: str, folder: str) -> None:
    device = torch.device("cuda", rank)
    group = init_context_parallel(rank, size, device, init_method)
    try:
        model = _dit().to(device)
        model.set_context_parallel(group)
        torch.save({name: out.cpu() for name, out in _dit_calls(model).items()}, f"{folder}/rank{rank}.pt")
    finally:
        group.close()


@pytest.mark.parametrize("size", [2, 4])
def test_nccl_dit_forward_matches_one_gpu(tmp_path, size):
    if torch.cuda.device_count() < size:
        pytest.skip(f"needs {size} GPUs, this machine has {torch.cuda.device_count()}")
    reference = {name: out.cpu() for name, out in _dit_calls(_dit().to("cuda:0")).items()}
    _run_ranks(_nccl_rank, size, size, loopback_init_method(), str(tmp_path))
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(size)]
    for name, expected in reference.items():
        for result in results:
            assert torch.equal(result[name], results[0][name]), name
        _assert_float32_bound(results[0][name], expected)
