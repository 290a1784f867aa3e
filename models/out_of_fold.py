"""Out-of-fold human evidence of the per-press model: train on half the training users (humans
and macro sessions by user index parity), score the other half's humans, which the model never
saw. How often unseen people reach the CUSUM's evidence, with more unseen people than the
validation split's 1,106. Prints the peak survival per fold.

    models/.venv/bin/python models/out_of_fold.py FOLD [--hidden H --epochs E --human-weight W]

(FOLD 0 or 1; about 4 min with the shipped settings.)

Reads the export of `cargo run --release --example export_presses` in models/data-presses."""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch
sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_stream as ts

ap = argparse.ArgumentParser(description="out-of-fold human evidence of the per-press model")
ap.add_argument("fold", type=int, choices=[0, 1])
ap.add_argument("--threads", type=int, default=1)
ap.add_argument("--hidden", type=int, default=ts.HIDDEN)
ap.add_argument("--epochs", type=int, default=16)
ap.add_argument("--human-weight", type=float, default=3.0)
cli = ap.parse_args()
fold = cli.fold
torch.set_num_threads(cli.threads)
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
args = argparse.Namespace(epochs=cli.epochs, hidden=cli.hidden, warm=6, crop=600, tbptt=100,
                          human_weight=cli.human_weight, seed=1)
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

# The policy as it would be calibrated on unseen people: for each (reference, clamp) of the
# training script's search, the threshold twice the highest evidence of the held-out half and
# the validation people (at least 4), and what it gives the validation split's mixed sessions.
val = ts.Sessions(Path("models/data-presses"), "validation")
lo_val = ts.log_odds(model, val, ((val.x - mean) / std).astype(np.float32))
val_humans = [lo_val[j] for j in np.flatnonzero(val.kind == "human")]
mixed = np.flatnonzero(val.kind == "mixed")
for ref in [0.0, 1.0, 2.0, 3.0, 4.0, 6.0]:
    for clamp in [2.0, 4.0, 8.0]:
        peak = max(p.max(initial=0.0) for p in ts.cusum_paths(lo + val_humans, ref, clamp))
        threshold = max(4.0, 2.0 * float(peak))
        paths = ts.cusum_paths(lo_val, ref, clamp)
        delays = [ts.first_over(paths[j], threshold) - val.onset[j] + 1 for j in mixed
                  if ts.first_over(paths[j], threshold) >= val.onset[j]]
        median = float(np.median(delays + [float("inf")] * (len(mixed) - len(delays))))
        print(f"fold {fold} reference {ref} clamp {clamp}: unseen peak {peak:.2f}, threshold {threshold:.2f}, "
              f"validation mixed caught {len(delays)} of {len(mixed)}, median {median}", flush=True)
