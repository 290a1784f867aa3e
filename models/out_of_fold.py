"""Out-of-fold human evidence of the per-press model: train on half the training users (humans
and macro sessions by user index parity), score the other half's humans, which the model never
saw. How often unseen people reach the CUSUM's evidence, with more unseen people than the
validation split's 1,106. Prints the peak survival per fold.

    models/.venv/bin/python models/out_of_fold.py FOLD [THREADS]     (FOLD 0 or 1; about 4 min)

Reads the export of `cargo run --release --example export_presses` in models/data-presses."""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch
sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_stream as ts

fold = int(sys.argv[1])
threads = int(sys.argv[2]) if len(sys.argv) > 2 else 1
torch.set_num_threads(threads)
np.random.seed(1); torch.manual_seed(1)
tr = ts.Sessions(Path("models/data-presses"), "train")
users = np.array([int(r["user"]) for r in tr.rows])

class Subset:
    def __init__(self, base, idx):
        self.rows = [base.rows[i] for i in idx]
        parts = [base.steps(i) for i in idx]
        self.x = np.concatenate(parts)
        lengths = np.array([len(p) for p in parts])
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])
        self.onset = base.onset[idx]; self.kind = base.kind[idx]; self.family = base.family[idx]
    def steps(self, j): return self.x[self.offsets[j]: self.offsets[j + 1]]
    def __len__(self): return len(self.rows)

fit_idx = np.flatnonzero(users % 2 != fold)
out_idx = np.flatnonzero((users % 2 == fold) & (tr.kind == "human"))
fit, held = Subset(tr, fit_idx), Subset(tr, out_idx)
mean, std = ts.fit_scaling(fit.x)
args = argparse.Namespace(epochs=16, hidden=ts.HIDDEN, warm=6, crop=600, tbptt=100, human_weight=3.0, seed=1)
model = ts.train(fit, ((fit.x - mean) / std).astype(np.float32), args)
lo = ts.log_odds(model, held, ((held.x - mean) / std).astype(np.float32))
fit_h = Subset(tr, np.flatnonzero((users % 2 != fold) & (tr.kind == "human")))
lo_fit = ts.log_odds(model, fit_h, ((fit_h.x - mean) / std).astype(np.float32))
for name, l in [("held-out", lo), ("fitted", lo_fit)]:
    peaks = np.array([p.max(initial=0.0) for p in ts.cusum_paths(l, 6.0, 2.0)])
    xs = np.concatenate(l)
    print(f"fold {fold} {name}: {len(peaks)} people; peak>0 {(peaks > 0).sum()}, >=2 {(peaks >= 2).sum()}, "
          f">=4.348 {(peaks >= 4.348).sum()}, >=8 {(peaks >= 8).sum()}; top {np.round(np.sort(peaks)[-6:], 2)}; "
          f"presses >=6 {(xs >= 6).sum()} >=8 {(xs >= 8).sum()} of {len(xs)}", flush=True)
