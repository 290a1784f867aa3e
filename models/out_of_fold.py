"""Out-of-fold human evidence of the per-press model: train on half the training users (humans
and macro sessions by user index parity), score the other half's humans, which the model never
saw. How often unseen people reach the CUSUM's evidence, with more unseen people than the
validation split's 1,106. Prints the peak survival per fold.

    models/.venv/bin/python models/out_of_fold.py FOLD [--hidden H --epochs E --human-weight W]

(FOLD 0 or 1; about 4 min with the shipped settings.)

Reads the export of `cargo run --release --example export_presses` in models/data-presses."""
import argparse
import json
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
ap.add_argument("--export", type=Path, help="also write the fold's model with the shipped policy here, "
                "for the Rust detector (`METRONOME_MODEL__PRESS_MANIFEST`) on the held-out people")
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
shipped = json.loads((Path(__file__).resolve().parent / "keystroke-stream-0.3.0.json").read_text())["policy"]
if cli.export:
    export_args = argparse.Namespace(**vars(args), data=Path("models/data-presses"))
    ts.export(model, cli.export, mean, std, shipped, {"fold": fold, "held_out": "training users of this parity"},
              ts.Sessions(Path("models/data-presses"), "validation"), export_args, len(fit.x))
lo = ts.log_odds(model, held, ((held.x - mean) / std).astype(np.float32))
fit_h = Subset(tr, np.flatnonzero((users % 2 != fold) & (tr.kind == "human")))
lo_fit = ts.log_odds(model, fit_h, ((fit_h.x - mean) / std).astype(np.float32))
for name, l in [("held-out", lo), ("fitted", lo_fit)]:
    peaks = np.array([p.max(initial=0.0) for p in ts.cusum_paths(l, shipped["reference"], shipped["clamp"])])
    xs = np.concatenate(l)
    print(f"fold {fold} {name}: {len(peaks)} people; peak>0 {(peaks > 0).sum()}, >=2 {(peaks >= 2).sum()}, "
          f">={shipped['threshold']} {(peaks >= shipped['threshold']).sum()}, >=8 {(peaks >= 8).sum()}; top {np.round(np.sort(peaks)[-6:], 2)}; "
          f"presses >=6 {(xs >= 6).sum()} >=8 {(xs >= 8).sum()} of {len(xs)}", flush=True)

# The policy as it would be calibrated on unseen people: the training script's own search
# (`choose_policy`), with the held-out half in place of the people the model trained on, so the
# threshold is twice the highest evidence of people it never saw; what each candidate gives
# the validation split's mixed sessions is printed.
val = ts.Sessions(Path("models/data-presses"), "validation")
lo_val = ts.log_odds(model, val, ((val.x - mean) / std).astype(np.float32))
print(f"fold {fold} calibrated on unseen people:", ts.choose_policy(lo_val, val, lo, 2.0), flush=True)
