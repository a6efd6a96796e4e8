"""Under torch.distributed the windows are split over ranks and NLL sums (not means) are reduced."""

from __future__ import annotations

import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from onebit.eval.perplexity import perplexity
from onebit.models import tiny_causal_lm

TIMEOUT = timedelta(seconds=120)  # a rank that hangs fails the test (gloo waits 30 min)


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=TIMEOUT)
    try:
        ids = torch.randint(0, 128, (7 * 16 + 5,), generator=torch.Generator().manual_seed(0))
        res = perplexity(tiny_causal_lm("llama"), ids, seqlen=16)
        torch.save(res.to_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_give_the_single_process_perplexity(tmp_path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    ids = torch.randint(0, 128, (7 * 16 + 5,), generator=torch.Generator().manual_seed(0))
    single = perplexity(tiny_causal_lm("llama"), ids, seqlen=16)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["n_tokens"] == single.n_tokens == 7 * 15  # 4 windows on rank 0, 3 on rank 1
        assert got["ppl"] == pytest.approx(single.ppl, rel=1e-6)
