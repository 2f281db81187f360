"""Scale-out on CPU with 2 gloo processes: DDP and both FSDP strategies equal one process at the same global batch;
FSDP (fully_shard) and DeepSpeed ZeRO-2 resume from their sharded checkpoints and consolidate to one safetensors file;
launch commands and the slurm script."""
import json, os, subprocess, sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlmrepro import distributed
from vlmrepro.core import VlmreproError

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT/"tests"/"dist_worker.py"
sys.path.insert(0, str(WORKER.parent))
from dist_worker import TinyNet

def _run(mode: str, out: Path, nproc: int = 1, strategy: str = "ddp", port: int = 29511):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "VLMREPRO_STRATEGY": strategy}
    cmd = [sys.executable, str(WORKER), mode, str(out)] if nproc == 1 else \
          [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}", str(WORKER), mode, str(out)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout

@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single"); _run("single", out)
    return out

def _close(a: dict, b: dict, atol=1e-5):
    assert sorted(a) == sorted(b)
    return max((a[k] - b[k]).abs().max().item() for k in a) < atol

def test_ddp_matches_one_process(single, tmp_path):
    _run("ddp", tmp_path, nproc=2, port=29512)
    one, two = load_file(single/"final.safetensors"), load_file(tmp_path/"final.safetensors")
    assert _close(one, two), "2-process DDP (batch 4 each) should end where 1 process (batch 8) ends"
    assert not _close(one, {k: v for k, v in TinyNet().state_dict().items() if k in one})   # it did train
    h1, h2 = json.loads((single/"history.json").read_text()), json.loads((tmp_path/"history.json").read_text())
    assert [r["step"] for r in h1] == [r["step"] for r in h2]
    for a, b in zip(h1, h2):   # losses and the extra value are gathered over both ranks: the global batch's
        assert abs(a["train/loss"] - b["train/loss"]) < 1e-5 and abs(a["train/acc"] - b["train/acc"]) < 1e-6 and a["train/lr"] == b["train/lr"]
    g = json.loads((tmp_path/"gather.json").read_text())
    assert g["world"] == 2 and g["rows"] == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]] and g["cat"] == [0, 1]
    assert g["grad"] == [[1.0, 1.0]]            # rank 0's own row got its gradient; the others arrived as constants
    assert abs(g["mean"]["acc"] - 2 / 3) < 1e-9  # (0 * 1 + 1 * 2) / 3

def test_zero2_trains_resumes_and_consolidates(single, tmp_path):
    _run("zero2", tmp_path, nproc=2, strategy="zero2", port=29513)
    ckpts = tmp_path/"run"/"checkpoints"
    last = ckpts/json.loads((ckpts/"latest.json").read_text())["checkpoint"]
    info = json.loads((last/"sharded.json").read_text())
    assert info["engine"] == "deepspeed" and info["world_size"] == 2
    assert len(list((last/"shards").glob("*optim_states.pt"))) == 2   # the optimizer state is split between the ranks
    merged = load_file(str(distributed.consolidate(last, tmp_path/"merged.safetensors")))
    assert _close(load_file(single/"final.safetensors"), merged), "ZeRO-2, killed at step 5 and resumed, should end where 1 process ends"
    metrics = [json.loads(l) for l in (tmp_path/"run"/"metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["train/loss"] < metrics[0]["train/loss"]

def _last_checkpoint(out: Path) -> Path:
    ckpts = out/"run"/"checkpoints"
    return ckpts/json.loads((ckpts/"latest.json").read_text())["checkpoint"]

def test_fsdp_full_resumes_matches_one_process_and_consolidates(single, tmp_path):
    "FULL_SHARD-like FSDP2, killed after step 5 and resumed from its step-4 checkpoint, ends where 1 uninterrupted process ends."
    from vlmrepro.checkpoint import load_model_weights
    stdout = _run("fsdp-full", tmp_path, nproc=2, strategy="fsdp-full", port=29514)
    assert "resumed from" in stdout and "step-0000004" in stdout
    last = _last_checkpoint(tmp_path)
    info = json.loads((last/"sharded.json").read_text())
    assert info["engine"] == "fsdp" and info["world_size"] == 2
    assert len(list((last/"shards").glob("*.distcp"))) == 2   # each rank wrote its own shards
    merged = distributed.consolidate(last, tmp_path/"merged.safetensors")
    one = load_file(single/"final.safetensors")
    assert _close(one, load_file(str(merged))), "FSDP full shard, resumed, should end where 1 process ends"
    m = load_model_weights(TinyNet(), merged)                  # the one file loads into a 1-process model
    for k, v in m.state_dict().items():
        assert torch.allclose(v, one[k], atol=1e-5) if k in one else torch.equal(v, TinyNet().state_dict()[k])   # frozen stem: its init
    h1, h2 = json.loads((single/"history.json").read_text()), json.loads((tmp_path/"history.json").read_text())
    assert [r["step"] for r in h1] == [r["step"] for r in h2] and abs(h1[-1]["train/loss"] - h2[-1]["train/loss"]) < 1e-5

def test_fsdp_grad_op_matches_one_process_with_weight_edits(tmp_path):
    "SHARD_GRAD_OP-like FSDP2 with a callback that edits weights after every step (through `full_params`) and evaluations equals 1 process."
    _run("single-clamp", tmp_path/"one")
    _run("fsdp-grad-op", tmp_path/"two", nproc=2, strategy="fsdp-grad-op", port=29515)
    one = load_file(tmp_path/"one"/"final.safetensors")
    two = load_file(str(distributed.consolidate(_last_checkpoint(tmp_path/"two"), tmp_path/"merged.safetensors")))
    assert _close(one, two), "2-process fsdp-grad-op should end where 1 process ends"
    assert two["head.bias"].abs().max() <= 0.02 + 1e-7       # the edit reached the shards
    evals = [[(r["step"], r["val/acc"]) for r in json.loads((tmp_path/d/"history.json").read_text()) if "val/acc" in r] for d in ("one", "two")]
    assert evals[0] == evals[1] and len(evals[0]) == 2        # evaluation forwards of the sharded model, each before a checkpoint

def test_consolidated_weights_load(single, tmp_path):
    "A consolidated file (trainable weights only) loads with checkpoint.load_model_weights like any other."
    from vlmrepro.checkpoint import load_model_weights
    from safetensors.torch import save_file
    w = load_file(single/"final.safetensors")
    save_file(w, str(tmp_path/"m.safetensors"), metadata={"format": "pt", "trainable_only": "True", "aliases": "{}"})
    m = load_model_weights(TinyNet(), tmp_path/"m.safetensors")
    assert torch.equal(m.head.weight, w["head.weight"])

def test_launch_command_and_slurm(tmp_path):
    cmd, env = distributed.launch_command(["run", "quickstart", "--run-id", "r"], "accelerate", nproc=2, nnodes=3, node_rank=2,
                                          master_addr="10.0.0.1", strategy="fsdp-full")
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and "--nnodes=3" in cmd and "--node_rank=2" in cmd
    assert cmd[cmd.index("-m", 3) + 1] == "vlmrepro.cli" and env["VLMREPRO_STRATEGY"] == "fsdp-full"
    with pytest.raises(VlmreproError, match="does not run under"): distributed.launch_command([], "deepspeed", strategy="ddp")
    p = distributed.write_slurm_script(tmp_path/"job.sh", ["run", "nxtp", "--preset", "paper"], nnodes=2, launcher="deepspeed")
    text = p.read_text()
    assert os.access(p, os.X_OK) and "#SBATCH --nodes=2" in text and "VLMREPRO_STRATEGY=zero2" in text
    assert subprocess.run(["bash", "-n", str(p)]).returncode == 0          # valid shell

def test_one_process_needs_no_group():
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    x = torch.ones(2, requires_grad=True)
    assert distributed.gather_with_local_grad(x) is x and distributed.reduce_mean({"a": 1}) == {"a": 1.0}
