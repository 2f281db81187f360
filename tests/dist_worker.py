"""Worker for tests/test_distributed.py: one `fit` of a tiny transformer-like model, run by torchrun or in-process.

python -m torch.distributed.run --nproc_per_node 2 tests/dist_worker.py MODE OUT  (MODE: ddp | zero2 | fsdp-full | fsdp-grad-op | single | single-clamp)
"""
import json, os, sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from vlmrepro import distributed
from vlmrepro.train import TrainConfig, fit

N, D = 64, 8

class TinyBlock(nn.Module):
    def __init__(self): super().__init__(); self.fc, self.norm = nn.Linear(D, D), nn.LayerNorm(D)
    def forward(self, x): return x + self.fc(self.norm(x)).tanh()

class TinyNet(nn.Module):
    "A frozen stem (FSDP ignores it), two blocks (FSDP wraps them), a head."
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Linear(D, D).requires_grad_(False)
        self.blocks = nn.ModuleList([TinyBlock(), TinyBlock()])
        self.head = nn.Linear(D, 2)
    def forward(self, x):
        h = self.stem(x)
        for b in self.blocks: h = b(h)
        return self.head(h)

def data():
    g = torch.Generator().manual_seed(1); y = torch.randint(0, 2, (N,), generator=g)
    return TensorDataset(torch.randn(N, D, generator=g) + y[:, None] - 0.5, y)

def loss_fn(m, b):
    logits = m(b[0])
    return F.cross_entropy(logits, b[1]), {"acc": (logits.argmax(-1) == b[1]).float().mean()}

def config(world: int, **kw) -> TrainConfig:
    "The same global batch (8) whatever the number of processes."
    return TrainConfig(epochs=2, batch_size=8 // world, lr=0.05, log_every=2, progress=False, seed=3, **kw)

def eval_fn(m):
    "Accuracy on the first 16 examples: under FSDP a forward of the sharded model, right before a checkpoint."
    x, y = data()[:16]
    return {"val/acc": (m(x).argmax(-1) == y).float().mean()}

class ClampBias:
    "Edits weights after every step, as FROMAGe's [RET] renorm does: under FSDP through `full_params`' whole tensors."
    def after_step(self, model, state):
        with torch.no_grad(): model.head.bias.clamp_(-0.02, 0.02)

class KillAt:
    def __init__(self, at): self.at = at
    def after_step(self, model, state):
        if state["step"] == self.at: raise KeyboardInterrupt(f"killed at {self.at}")

def gather_checks(out: Path):
    "FROMAGe's gather: the global rows arrive, only the local ones carry gradient, sizes may differ."
    r, w = distributed.rank(), distributed.world_size()
    x = torch.full((r + 1, 2), float(r), requires_grad=True)
    g = distributed.gather_with_local_grad(x)
    (g * (1 + torch.arange(len(g)))[:, None]).sum().backward()
    res = {"rows": g.detach().tolist(), "grad": x.grad.tolist(), "cat": distributed.gather_cat(torch.tensor([r])).tolist(),
           "mean": distributed.reduce_mean({"acc": r}, weight=r + 1), "world": w}
    if r == 0: (out/"gather.json").write_text(json.dumps(res))

def main(mode: str, out: str):
    out = Path(out); out.mkdir(parents=True, exist_ok=True)
    w = distributed.world_size()
    if mode.startswith("single"): w = 1
    cfg = config(w, ckpt_every=4)
    cbs = [ClampBias()] if mode in ("fsdp-grad-op", "single-clamp") else []
    if mode in ("fsdp-full", "zero2"):   # killed after step 5, resumed from the sharded checkpoint of step 4
        try: fit(TinyNet(), data(), cfg, out/"run", loss_fn=loss_fn, callbacks=[KillAt(5)])
        except KeyboardInterrupt: pass
    model = TinyNet()
    res = fit(model, data(), cfg, out/"run", loss_fn=loss_fn, callbacks=cbs, eval_fn=eval_fn if cbs else None)
    if mode == "ddp": gather_checks(out)   # the process group exists once fit's Accelerator made it
    if distributed.is_main():
        (out/"history.json").write_text(json.dumps(res.history))
        if mode in ("ddp", "single", "single-clamp"):
            from vlmrepro.checkpoint import save_model_weights
            save_model_weights(model, out/"final.safetensors", trainable_only=True)
    return res

if __name__ == "__main__": main(*sys.argv[1:3])
