"""torch.distributed: two CPU processes (gloo) train a retrain model under DistributedDataParallel and calibrate
a PTQ model on their halves of the data. Initial ranges agree (and equal one process seeing both halves),
learned parameters stay identical, only rank 0 writes, the others wait for its files."""

import json
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import omct.pytorch as amct
from omct.formats.record import read_record

WORLD = 2


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 8, 3, stride=2),
                         nn.ReLU(), nn.Flatten(), nn.Linear(8 * 3 * 3, 3)).eval()


def _data(rank):
    """Rank ``rank``'s shard: different data on each process."""
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.rand(4, 16, 1, 8, 8, generator=gen) * (1 + rank)
    return x, torch.randint(0, 3, (4, 16), generator=gen)


def _worker(rank, port, tmp):
    import torch.distributed as dist

    import omct.pytorch.retrain.api as retrain_api
    from omct.quantize import QuantizedModel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMCT_QUIET="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    tmp = Path(tmp)
    try:
        if rank != 0:  # any write on another rank fails the test
            def refuse(*_a, **_k):
                raise AssertionError(f"rank {rank} wrote a file")
            QuantizedModel.save = refuse
            retrain_api.write_record = refuse
            retrain_api.save_retrain_config = refuse
        model, (x, y) = _model(), _data(rank)
        example = x[0, :2]
        amct.create_quant_retrain_config(str(tmp / "retrain.json"), model, example)  # rank 0 writes, others wait
        qat = amct.create_quant_retrain_model(str(tmp / "retrain.json"), model, str(tmp / "record.txt"), example)
        ddp = nn.parallel.DistributedDataParallel(qat)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
        initial = None
        for step in range(4):
            opt.zero_grad()
            nn.functional.cross_entropy(ddp(x[step]), y[step]).backward()
            opt.step()
            if step == 0:  # batch_num 1: the ranges are set by the first batch (both ranks' statistics)
                initial = {k: (float(q.clip_min.detach()), float(q.clip_max.detach())) for k, q in qat.act_quantizers.items()}
        state = {k: v.detach().numpy().tolist() for k, v in qat.state_dict().items()}
        amct.save_quant_retrain_model(str(tmp / "retrain.json"), ddp, str(tmp / "record.txt"), str(tmp / "qat"), example,
                                      input_names=["input"])
        files_there = (tmp / "qat_deploy_model.onnx").is_file() and (tmp / "record.txt").is_file()

        # PTQ: each rank calibrates on its own shard; rank 0 writes the modified model and the record
        if rank == 0:
            amct.create_quant_config(str(tmp / "ptq.json"), model, example, batch_num=2)
        dist.barrier()
        cal = amct.quantize_model(str(tmp / "ptq.json"), str(tmp / "ptq_mod.onnx"), str(tmp / "ptq_record.txt"),
                                  model, example)
        with torch.no_grad():
            cal(x[0])
            cal(x[1])
        ptq_there = (tmp / "ptq_record.txt").read_text().startswith("record")
        (tmp / f"rank{rank}.json").write_text(json.dumps({"initial": initial, "state": state, "files": files_there,
                                                            "ptq": ptq_there}))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
@pytest.mark.skipif(sys.platform == "win32", reason="gloo on Windows needs a file store")
def test_two_processes_train_and_calibrate_as_one(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert ranks[0]["initial"] == ranks[1]["initial"]
    for key in ranks[0]["state"]:
        np.testing.assert_array_equal(np.asarray(ranks[0]["state"][key]), np.asarray(ranks[1]["state"][key]), err_msg=key)
    assert all(r["files"] and r["ptq"] for r in ranks)  # rank 1 returned only after rank 0's files were there

    # one process seeing both ranks' first batches gets the same initial ranges ...
    model = _model()
    example = _data(0)[0][0, :2]
    cfg = json.loads((tmp_path / "retrain.json").read_text())
    cfg["batch_num"] = 2
    (tmp_path / "one.json").write_text(json.dumps(cfg))
    one = amct.create_quant_retrain_model(str(tmp_path / "one.json"), model, str(tmp_path / "one.txt"), example)
    for r in range(WORLD):
        one(_data(r)[0][0])
    for k, q in one.act_quantizers.items():
        got = (float(q.clip_min.detach()), float(q.clip_max.detach()))
        assert got == pytest.approx(tuple(ranks[0]["initial"][k]), rel=1e-6), k

    # ... and the same PTQ record as calibrating on all the data (the sketches merge exactly)
    amct.create_quant_config(str(tmp_path / "p1.json"), model, example, batch_num=4)
    cal = amct.quantize_model(str(tmp_path / "p1.json"), str(tmp_path / "p1.onnx"), str(tmp_path / "p1.txt"), model, example)
    with torch.no_grad():
        for r in range(WORLD):
            cal(_data(r)[0][0])
            cal(_data(r)[0][1])
    single, merged = read_record(tmp_path / "p1.txt"), read_record(tmp_path / "ptq_record.txt")
    assert set(single) == set(merged)
    for name in single:
        assert merged[name].scale_d == pytest.approx(single[name].scale_d, rel=1e-6)
        assert merged[name].offset_d == single[name].offset_d
        assert merged[name].bias_correction == pytest.approx(single[name].bias_correction, rel=1e-4, abs=1e-7)
