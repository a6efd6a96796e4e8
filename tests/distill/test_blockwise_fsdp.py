"""The block-wise stage on FSDP2-sharded models (two CPU processes, gloo): the ranks train the
blocks one process would, and a stage killed part way resumes, each rank from its own shards."""

from __future__ import annotations

import copy
import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from onebit.distill.blockwise import BlockwiseConfig, _Interrupted, blockwise_reconstruct_
from onebit.models import tiny_causal_lm
from onebit.quant import OneBitConfig, freeze_, quantize_
from onebit.quant.convert import find_decoder_blocks

pytestmark = pytest.mark.slow

CFG = BlockwiseConfig(steps=8, batch_size=2)

TIMEOUT = timedelta(seconds=120)  # a rank that hangs fails the test (gloo waits 30 min)


def _pair():
    torch.manual_seed(0)
    teacher = tiny_causal_lm("llama", num_hidden_layers=3).eval()
    return teacher, freeze_(quantize_(copy.deepcopy(teacher), OneBitConfig()))


def _ids() -> torch.Tensor:
    return torch.randint(0, 128, (6, 16), generator=torch.Generator().manual_seed(1))


def _shard(model: torch.nn.Module, mesh) -> None:
    from torch.distributed.fsdp import fully_shard

    for block in find_decoder_blocks(model)[1]:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
        for k, v in model.state_dict().items()
    }


def _worker(rank: int, world: int, port: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=TIMEOUT)
    try:
        mesh = init_device_mesh("cpu", (world,))
        got = {}
        teacher, student = _pair()
        _shard(teacher, mesh)
        _shard(student, mesh)
        got["result"] = blockwise_reconstruct_(teacher, student, _ids(), CFG, progress=False)
        got["state"] = _full_state(student)
        # killed after block 0, then resumed on freshly built and sharded models
        path = os.path.join(out, f"state.pt.rank{rank}")
        teacher, student = _pair()
        _shard(teacher, mesh)
        _shard(student, mesh)
        try:
            blockwise_reconstruct_(
                teacher, student, _ids(), CFG, state_path=path, progress=False, _stop_after=0
            )
        except _Interrupted:
            got["interrupted"] = True
        teacher, student = _pair()
        _shard(teacher, mesh)
        _shard(student, mesh)
        got["resumed"] = blockwise_reconstruct_(
            teacher, student, _ids(), CFG, state_path=path, progress=False
        )
        got["resumed_state"] = _full_state(student)
        torch.save(got, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_sharded_ranks_train_the_blocks_one_process_would_and_resume(tmp_path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    teacher, student = _pair()
    untrained = _full_state(student)
    single = blockwise_reconstruct_(teacher, student, _ids(), CFG, progress=False)
    ref = _full_state(student)
    assert [b["block"] for b in single["blocks"]] == [0, 1, 2]
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert got["interrupted"]
        assert (tmp_path / f"state.pt.rank{rank}.block0000").is_file()  # this rank's shards
        for run, state in (("result", "state"), ("resumed", "resumed_state")):
            for a, b in zip(got[run]["blocks"], single["blocks"], strict=True):
                assert a["block"] == b["block"]
                for key in ("rel_err_before", "rel_err_after", "loss_after"):
                    assert a[key] == pytest.approx(b[key], rel=1e-4), (run, key, a["block"])
            assert got[state].keys() == ref.keys()
            changed = 0
            for k, v in ref.items():
                torch.testing.assert_close(got[state][k], v, rtol=1e-4, atol=1e-6, msg=k)
                changed += not torch.equal(v, untrained[k])
            assert changed > 0  # the stage trained something, and the shards hold it
