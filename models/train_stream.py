"""Trains Metronome's per-press (streaming) LSTM and exports it to ONNX with its manifest.

The window model (`train.py`) scores 50 presses from a zero state every 10 presses. This one
carries its state from press to press and gives a log-odds per press, so a macro can be told
as soon as the presses since its onset say so, with no hop and no window to fill.

Reads the sessions `cargo run --release --example export_presses` writes (every settled press
of every session, the detector's own step encoding, and where the macro starts), trains on the
train split with truncated backpropagation through time, picks the alerting policy (a CUSUM
over per-press log-odds) on the validation split, and writes:

- models/<name>-<version>.onnx      inputs steps[T,B,F], h0[1,B,H], c0[1,B,H];
                                    outputs logit[T,B], hn[1,B,H], cn[1,B,H]
- models/<name>-<version>.json      manifest: input spec, scaling, policy, sha256, figures
- models/<name>-<version>.vectors.json  fixed raw sequences with PyTorch's per-press
                                    log-odds, for the Rust agreement test

Labels: a human's presses 0; a macro's 1 from its onset, with the first `--warm` presses after
the onset left out of the loss (nothing can tell a macro from its first presses). Long human
sessions are cropped to `--crop` presses at a random start, from a zero state, so the model
learns to start anywhere and not to drift over a long session.

Usage: python models/train_stream.py --data models/data-presses [--epochs N] [--out models]
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

NAME = "keystroke-stream"
VERSION = "0.3.0"
HIDDEN = 48
WIDTH = 8


class Sessions:
    """One split: per-press raw steps and per-session metadata."""

    def __init__(self, data: Path, split: str):
        with open(data / f"presses-{split}.csv", newline="") as f:
            self.rows = list(csv.DictReader(f))
        self.x = np.fromfile(data / f"presses-{split}.f32", dtype="<f4").reshape(-1, WIDTH)
        lengths = np.array([int(r["steps"]) for r in self.rows])
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])
        if self.offsets[-1] != len(self.x):
            sys.exit(f"{split}: sessions hold {self.offsets[-1]} presses, the steps file {len(self.x)}")
        self.onset = np.array([int(r["onset"]) for r in self.rows])
        self.kind = np.array([r["kind"] for r in self.rows])
        self.family = np.array([r["family"] for r in self.rows])

    def steps(self, j: int) -> np.ndarray:
        return self.x[self.offsets[j] : self.offsets[j + 1]]

    def __len__(self) -> int:
        return len(self.rows)


class StreamLstm(nn.Module):
    """One LSTM layer, a log-odds per press from each hidden state."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.lstm = nn.LSTM(width, hidden)
        self.head = nn.Linear(hidden, 1)

    def forward(self, steps, h0, c0):
        out, (hn, cn) = self.lstm(steps, (h0, c0))
        return self.head(out).squeeze(-1), hn, cn


def fit_scaling(x: np.ndarray):
    mean, std = x.mean(axis=0), x.std(axis=0)
    mean[0], std[0] = 0.0, 1.0
    std[std < 1e-6] = 1.0
    return mean.astype(np.float32), std.astype(np.float32)


def padded(sessions: Sessions, idx, scaled: np.ndarray, crop: int | None, warm: int, rng):
    """[T, B, F] steps, [T, B] labels and loss weights (0 on padding and after-onset warm-up)."""
    parts = []
    for j in idx:
        n = sessions.offsets[j + 1] - sessions.offsets[j]
        start = 0
        if crop and n > crop and sessions.onset[j] < 0:
            start = int(rng.integers(0, n - crop))
        end = n if not crop else min(n, start + crop)
        y = np.zeros(end - start, np.float32)
        m = np.ones(end - start, np.float32)
        onset = sessions.onset[j]
        if onset >= 0:
            y[max(0, onset - start) :] = 1.0
            m[max(0, onset - start) : max(0, onset - start + warm)] = 0.0
        o = sessions.offsets[j]
        parts.append((scaled[o + start : o + end], y, m))
    t = max(len(p[0]) for p in parts)
    xb = np.zeros((t, len(parts), WIDTH), np.float32)
    yb = np.zeros((t, len(parts)), np.float32)
    mb = np.zeros((t, len(parts)), np.float32)
    for k, (a, y, m) in enumerate(parts):
        xb[: len(a), k], yb[: len(a), k], mb[: len(a), k] = a, y, m
    return xb, yb, mb


def train(sessions: Sessions, scaled: np.ndarray, args) -> StreamLstm:
    rng = np.random.default_rng(args.seed)
    model = StreamLstm(WIDTH, args.hidden)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs)
    bce = nn.BCEWithLogitsLoss(reduction="none")
    for epoch in range(args.epochs):
        model.train()
        order = rng.permutation(len(sessions))
        total, weight = 0.0, 0.0
        for i in range(0, len(order), 128):
            xb, yb, mb = padded(sessions, order[i : i + 128], scaled, args.crop, args.warm, rng)
            # A flagged human costs far more than a macro caught a press later.
            wb = np.where(yb < 0.5, args.human_weight, 1.0).astype(np.float32) * mb
            h = torch.zeros(1, xb.shape[1], args.hidden)
            c = torch.zeros_like(h)
            for s in range(0, len(xb), args.tbptt):
                logit, h, c = model(torch.from_numpy(xb[s : s + args.tbptt]), h, c)
                w = torch.from_numpy(wb[s : s + args.tbptt])
                loss = (bce(logit, torch.from_numpy(yb[s : s + args.tbptt])) * w).sum() / w.sum().clamp(min=1.0)
                opt.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                h, c = h.detach(), c.detach()
                total += float(loss.detach()) * float(w.sum())
                weight += float(w.sum())
        sched.step()
        print(f"epoch {epoch + 1}: train loss {total / max(weight, 1.0):.4f}", flush=True)
    return model


def log_odds(model: StreamLstm, sessions: Sessions, scaled: np.ndarray):
    """Per-press log-odds of every session, each from a zero state."""
    model.eval()
    out = [None] * len(sessions)
    lengths = np.diff(sessions.offsets)
    order = np.argsort(lengths)
    with torch.no_grad():
        for i in range(0, len(order), 256):
            idx = order[i : i + 256]
            xb, _, _ = padded(sessions, idx, scaled, None, 0, None)
            h = torch.zeros(1, len(idx), model.lstm.hidden_size)
            logit, _, _ = model(torch.from_numpy(xb), h, torch.zeros_like(h))
            for k, j in enumerate(idx):
                out[j] = logit[: lengths[j], k].numpy()
    return out


def cusum_paths(lo: list, ref: float, clamp: float) -> list:
    """S_t = max(0, S_{t-1} + clamp(x_t - ref)), per session, vectorised across sessions."""
    n = max(len(v) for v in lo)
    x = np.full((n, len(lo)), -np.inf, np.float32)
    for k, v in enumerate(lo):
        x[: len(v), k] = v
    inc = np.clip(x - ref, -clamp, clamp)
    s = np.zeros(len(lo), np.float32)
    paths = np.zeros_like(x)
    for t in range(n):
        s = np.maximum(0.0, s + inc[t])
        paths[t] = s
    return [paths[: len(v), k] for k, v in enumerate(lo)]


def first_over(path: np.ndarray, threshold: float) -> int:
    hit = np.flatnonzero(path >= threshold)
    return int(hit[0]) if len(hit) else -1


def choose_policy(lo: list, sessions: Sessions, train_human_lo: list, margin: float):
    """The (reference, clamp, threshold) with the smallest median presses from onset to alert
    on mixed sessions (a miss counting as never), among those whose threshold is at least `margin` times every human's
    highest evidence, validation's and training's: the tail of people's evidence grows with
    their number, and 1,106 validation people alone set it too low (2 of 4,499 training
    people crossed a threshold twice the validation peak)."""
    humans = np.flatnonzero(sessions.kind == "human")
    mixed = np.flatnonzero(sessions.kind == "mixed")
    best = None
    for ref in [0.0, 1.0, 2.0, 3.0, 4.0, 6.0]:
        for clamp in [2.0, 4.0, 8.0]:
            paths = cusum_paths(lo, ref, clamp)
            peak = max(float(paths[j].max(initial=0.0)) for j in humans)
            peak = max(peak, max(float(p.max(initial=0.0)) for p in cusum_paths(train_human_lo, ref, clamp)))
            threshold = max(4.0, margin * peak)
            delays, before = [], 0
            for j in mixed:
                t = first_over(paths[j], threshold)
                if 0 <= t < sessions.onset[j]:
                    before += 1
                elif t >= 0:
                    delays.append(t - sessions.onset[j] + 1)
            caught = len(delays)
            # Misses count as never: a policy cannot buy speed by giving sessions up.
            median = float(np.median(delays + [float("inf")] * (len(mixed) - caught)))
            key = (median, -caught)
            print(f"policy reference {ref} clamp {clamp}: human peak {peak:.2f}, threshold {threshold:.2f}, "
                  f"mixed caught {caught}, median {median}", flush=True)
            if best is None or key < best[0]:
                best = (key, {"reference": ref, "clamp": clamp, "threshold": round(threshold, 3),
                              "human_peak": round(peak, 3)})
    return best[1]


def report(lo: list, sessions: Sessions, policy: dict) -> dict:
    paths = cusum_paths(lo, policy["reference"], policy["clamp"])
    out = {"humans": int((sessions.kind == "human").sum())}
    out["humans_flagged"] = int(sum(first_over(paths[j], policy["threshold"]) >= 0
                                    for j in np.flatnonzero(sessions.kind == "human")))
    for kind in ["macro", "mixed"]:
        per_family = {}
        for fam in sorted(set(sessions.family[sessions.kind == kind])):
            idx = np.flatnonzero((sessions.kind == kind) & (sessions.family == fam))
            delays, before = [], 0
            for j in idx:
                t = first_over(paths[j], policy["threshold"])
                onset = max(0, sessions.onset[j])
                if 0 <= t < onset:
                    before += 1
                elif t >= 0:
                    delays.append(t - onset + 1)
            per_family[fam] = {"sessions": len(idx), "caught": len(delays), "before_onset": before,
                               "median_presses": float(np.median(delays)) if delays else None}
        out[kind] = per_family
    all_mixed = []
    for j in np.flatnonzero(sessions.kind == "mixed"):
        t = first_over(paths[j], policy["threshold"])
        if t >= sessions.onset[j]:
            all_mixed.append(t - sessions.onset[j] + 1)
    out["mixed_median_presses"] = float(np.median(all_mixed)) if all_mixed else None
    out["mixed_caught"] = len(all_mixed)
    return out


def export(model, out: Path, mean, std, policy, validation, val: Sessions, args, spec_presses: int):
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{NAME}-{VERSION}"
    onnx_path = out / f"{stem}.onnx"
    model.eval()
    hidden = model.lstm.hidden_size
    example = torch.zeros(3, 2, WIDTH)
    zeros = torch.zeros(1, 2, hidden)
    torch.onnx.export(
        model, (example, zeros, zeros), str(onnx_path),
        input_names=["steps", "h0", "c0"], output_names=["logit", "hn", "cn"],
        dynamic_axes={"steps": {0: "T", 1: "B"}, "h0": {1: "B"}, "c0": {1: "B"},
                      "logit": {0: "T", 1: "B"}, "hn": {1: "B"}, "cn": {1: "B"}},
        opset_version=17, dynamo=False,
    )
    onnx_bytes = onnx_path.read_bytes()

    # Fixed vectors: chimeras (press t of a random validation session of the kind at press t),
    # realistic inputs that are no real person's keystroke sequence.
    rng = np.random.default_rng(args.seed)
    length = 120
    sequences = []
    for kind in ["human", "human", "macro", "mixed"]:
        idx = [j for j in np.flatnonzero(val.kind == kind) if val.offsets[j + 1] - val.offsets[j] >= length]
        donors = rng.choice(idx, size=length)
        sequences.append((kind, np.stack([val.steps(j)[t] for t, j in enumerate(donors)])))
    raw = np.stack([s for _, s in sequences], axis=1)  # [T, B, F]
    scaled = ((raw - mean) / std).astype(np.float32)
    with torch.no_grad():
        h = torch.zeros(1, raw.shape[1], hidden)
        expected, _, _ = model(torch.from_numpy(scaled), h, torch.zeros_like(h))
    expected = expected.numpy()
    check_onnxruntime(onnx_path, scaled, expected, hidden)
    vectors = {
        "model": stem,
        "step_width": WIDTH,
        "sequences": [
            {"kind": kind, "steps": [float(v) for v in raw[:, k].reshape(-1)],
             "log_odds": [float(v) for v in expected[:, k]]}
            for k, (kind, _) in enumerate(sequences)
        ],
    }
    (out / f"{stem}.vectors.json").write_text(json.dumps(vectors) + "\n")
    spec = json.loads((args.data / "export.json").read_text()) if (args.data / "export.json").exists() else {}
    manifest = {
        "name": NAME,
        "version": VERSION,
        "file": onnx_path.name,
        "sha256": hashlib.sha256(onnx_bytes).hexdigest(),
        "bytes": len(onnx_bytes),
        "architecture": f"LSTM(1 layer, {hidden} hidden) carried from press to press -> linear: a log-odds per press",
        "input": {
            "steps": 1,
            "step_features": spec.get("step_features", []),
            "layout": "steps[T, B, F] f32, h0[1, B, H] and c0[1, B, H] f32 (the user's carried state; zeros at a session's start)",
            "hidden": hidden,
            "outputs": ["logit[T, B]", "hn[1, B, H]", "cn[1, B, H]"],
        },
        "scaling": {"mean": [float(v) for v in mean], "std": [float(v) for v in std],
                    "rule": "every step: (x - mean) / std"},
        "policy": policy,
        "training": {
            "humans": "Aalto 136M keystrokes (Dhakal et al., CHI 2018), subsets A and B from ../shared/data, "
                      "train split of users by FNV-1a hash (never in validation or test)",
            "macros": "metronome::macrogen, the window-visible families but human_iid; a third with holds "
                      "drawn from a human recording; mixed human-then-macro sessions labelled from the onset",
            "export": spec,
            "train_presses": spec_presses,
            "epochs": args.epochs, "warm": args.warm, "crop": args.crop, "tbptt": args.tbptt,
            "human_weight": args.human_weight, "seed": args.seed, "torch": torch.__version__,
        },
        "validation": validation,
    }
    (out / f"{stem}.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {onnx_path} ({len(onnx_bytes)} bytes) and {stem}.json")


def check_onnxruntime(path: Path, scaled: np.ndarray, expected: np.ndarray, hidden: int) -> None:
    """The exported graph must compute what PyTorch computed, in one call and press by press."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path))
    zeros = np.zeros((1, scaled.shape[1], hidden), dtype=np.float32)
    whole = sess.run(["logit"], {"steps": scaled, "h0": zeros, "c0": zeros})[0]
    h, c, stepped = zeros, zeros, []
    for t in range(len(scaled)):
        logit, h, c = sess.run(["logit", "hn", "cn"], {"steps": scaled[t : t + 1], "h0": h, "c0": c})
        stepped.append(logit[0])
    err = max(float(np.abs(whole - expected).max()), float(np.abs(np.stack(stepped) - expected).max()))
    if err > 1e-4:
        sys.exit(f"ONNX export disagrees with PyTorch by {err}")
    print(f"onnxruntime agrees with PyTorch to {err:.2e} (whole sequence and press by press)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("models/data-presses"))
    ap.add_argument("--out", type=Path, default=Path("models"))
    ap.add_argument("--epochs", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=HIDDEN)
    ap.add_argument("--warm", type=int, default=6, help="presses after an onset left out of the loss")
    ap.add_argument("--crop", type=int, default=600, help="longest stretch of a human session per batch")
    ap.add_argument("--tbptt", type=int, default=100, help="presses per truncated backpropagation")
    ap.add_argument("--human-weight", type=float, default=3.0)
    ap.add_argument("--margin", type=float, default=2.0,
                    help="alert threshold over the highest validation human evidence, as a factor")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    tr, val = Sessions(args.data, "train"), Sessions(args.data, "validation")
    mean, std = fit_scaling(tr.x)
    model = train(tr, ((tr.x - mean) / std).astype(np.float32), args)
    lo = log_odds(model, val, ((val.x - mean) / std).astype(np.float32))
    train_lo = log_odds(model, tr, ((tr.x - mean) / std).astype(np.float32))
    train_human_lo = [train_lo[j] for j in np.flatnonzero(tr.kind == "human")]
    policy = choose_policy(lo, val, train_human_lo, args.margin)
    validation = report(lo, val, policy)
    print(json.dumps({"policy": policy, "validation": validation}, indent=2))
    export(model, args.out, mean, std, policy, validation, val, args, len(tr.x))


if __name__ == "__main__":
    main()
