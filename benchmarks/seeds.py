"""Pretrain + fine-tune one token store under several seeds and tabulate every variant across them.

    python benchmarks/seeds.py STORE --run runs/speech-seeds --seeds 0,1,2 [--folds 5]
        [--label-fraction 0.1,1] [--preset tiny] [--set key=value ...]

For each seed S it runs, as a user would, ``vqmae pretrain STORE --set seed=S`` into RUN/seedS/pretrain
and ``vqmae finetune STORE --mae RUN/seedS/pretrain/mae.pt --set seed=S`` into RUN/seedS/finetune (the
seed draws the pretraining, the speaker folds, the label subsets and every initialisation). A seed
whose finetune summary exists is not rerun; an interrupted one resumes (both commands resume).

It prints, and writes to RUN/seeds.md and RUN/seeds.json:

* per variant, label fraction and evaluated modalities: the mean over seeds of the fold-mean UAR,
  the mean fold std, and each seed's fold mean ± std;
* the pretraining margin per seed (held-out masked-token accuracy minus the unigram baseline);
* in how many seeds the pretrained transformer beats scratch by more than the fold spread (the
  larger of the two fold stds) at each label fraction;
* for audiovisual stores, each variant's av / audio / visual UAR on the same talking-face clips
  (the report's paired table) per seed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path


def run_seed(args: argparse.Namespace, seed: int, sets: list[str]) -> dict:
    root = args.run / f"seed{seed}"
    summary = root / "finetune" / "summary.json"
    if not summary.exists():
        common = ["--preset", args.preset, "--device", args.device, "--set", f"seed={seed}", *sets]
        vqmae = [sys.executable, "-m", "vqmae_cli.main"]
        subprocess.run([*vqmae, "pretrain", str(args.store), "--run-dir", str(root / "pretrain"), *common],
                       check=True)
        subprocess.run([*vqmae, "finetune", str(args.store), "--mae", str(root / "pretrain" / "mae.pt"),
                        "--run", str(root / "finetune"), "--folds", str(args.folds),
                        "--label-fraction", args.label_fraction, *common], check=True)
    pre = json.loads((root / "pretrain" / "summary.json").read_text())
    ft = json.loads(summary.read_text())
    if "paired" not in ft:  # a run made before the report had the table: computed from its files
        ft["paired"] = _paired(root / "finetune", ft)
    return {"finetune": ft, "pretrain": pre}


def _paired(run: Path, summary: dict) -> list:
    from types import SimpleNamespace

    from vqmae.config import Config
    from vqmae.stages.finetune.report import paired_modalities
    from vqmae.tasks import task_from_dict

    cfg = Config.from_dict(json.loads((run / "config.json").read_text()))
    units = [SimpleNamespace(unit=u["unit"]) for u in summary["units"]]
    return paired_modalities(units, cfg, task_from_dict(summary["task"]), run)


def margins(pretrain_summary: dict) -> dict[str, float]:
    """Held-out masked-token accuracy minus the unigram baseline, per modality."""
    return {m: round(v["masked_token_accuracy"] - v["unigram_accuracy"], 4)
            for m, v in pretrain_summary["modalities"].items()}


def tabulate(results: dict[int, dict]) -> tuple[list[dict], list[str]]:
    seeds = sorted(results)
    cells: dict[tuple, dict[int, tuple[float, float]]] = {}
    for s in seeds:
        for row in results[s]["finetune"]["rows"]:
            key = (row["variant"], row.get("fraction"), row["eval"])
            cells.setdefault(key, {})[s] = (row["uar"]["mean"], row["uar"]["std"])
    rows = []
    for (variant, frac, ev), per in sorted(cells.items(), key=lambda kv: (kv[0][1] or 0, kv[0][2], kv[0][0])):
        means = [per[s][0] for s in seeds if s in per]
        rows.append({"variant": variant, "fraction": frac, "eval": ev,
                     "mean": statistics.fmean(means),
                     "seed_std": statistics.pstdev(means) if len(means) > 1 else 0.0,
                     "fold_std": statistics.fmean(per[s][1] for s in seeds if s in per),
                     "per_seed": {s: per[s] for s in seeds if s in per}})
    lines = ["| variant | labels | eval | UAR, mean over seeds | std over seeds | mean fold std | "
             + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(seeds)]
    for r in rows:
        frac = f"{100 * r['fraction']:g}%" if r["fraction"] is not None else ""
        lines.append(f"| {r['variant']} | {frac} | {r['eval']} | {r['mean']:.3f} | {r['seed_std']:.3f} | "
                     f"{r['fold_std']:.3f} | "
                     + " | ".join(f"{r['per_seed'][s][0]:.3f} ± {r['per_seed'][s][1]:.3f}"
                                  if s in r["per_seed"] else "" for s in seeds) + " |")
    lines.append("")
    for s in seeds:
        lines.append(f"- seed {s}: pretraining margin over the unigram "
                     + ", ".join(f"{m} {v:+.3f}" for m, v in margins(results[s]["pretrain"]).items()))
    paired = {s: {r["variant"]: r for r in results[s]["finetune"].get("paired", [])} for s in seeds}
    variants = [v for v in ("pretrained", "probe", "scratch", "tokens") if all(v in paired[s] for s in seeds)]
    if variants:
        lines += ["", "Audiovisual against each modality alone, on the same talking-face clips (UAR, mean over "
                  "seeds of the fold means; each seed's av / audio / visual):", "",
                  "| variant | av | audio | visual | " + " | ".join(f"seed {s}" for s in seeds) + " |",
                  "|---|---|---|---|" + "---|" * len(seeds)]
        for v in variants:
            means = {m: statistics.fmean(paired[s][v][m]["mean"] for s in seeds) for m in ("av", "audio", "visual")}
            lines.append(f"| {v} | {means['av']:.3f} | {means['audio']:.3f} | {means['visual']:.3f} | " + " | ".join(
                " / ".join(f"{paired[s][v][m]['mean']:.3f} ± {paired[s][v][m]['std']:.3f}" for m in ("av", "audio", "visual"))
                for s in seeds) + " |")
        lines.append("")
        for v in variants:  # the paired test per seed: each fold's av minus its one modality
            for m in ("audio", "visual"):
                diffs = [paired[s][v].get(f"av-{m}") for s in seeds]
                if all(diffs):
                    wins = sum(d["mean"] > d["std"] for d in diffs)
                    lines.append(f"- {v}: av beats {m} by more than the spread of the per-fold differences in "
                                 f"{wins} of {len(seeds)} seeds (" + ", ".join(
                                     f"{d['mean']:+.3f} ± {d['std']:.3f}" for d in diffs) + ")")
        lines.append("")
    for frac in sorted({r["fraction"] for r in rows if r["fraction"] is not None}):
        for ev in sorted({r["eval"] for r in rows}):
            pre = next((r for r in rows if (r["variant"], r["fraction"], r["eval"]) == ("pretrained", frac, ev)),
                       None)
            scr = next((r for r in rows if (r["variant"], r["fraction"], r["eval"]) == ("scratch", frac, ev)), None)
            if not pre or not scr:
                continue
            wins = sum(1 for s in seeds if s in pre["per_seed"] and s in scr["per_seed"] and
                       pre["per_seed"][s][0] - scr["per_seed"][s][0] >
                       max(pre["per_seed"][s][1], scr["per_seed"][s][1]))
            lines.append(f"- {100 * frac:g}% of the labels, {ev}: pretrained beats scratch by more than "
                         f"the fold spread in {wins} of {len(seeds)} seeds")
    return rows, lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("store", type=Path)
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--folds", type=int, default=4)
    ap.add_argument("--label-fraction", default="0.25,1")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="key=value, given to both commands")
    args = ap.parse_args()
    sets = [x for kv in args.sets for x in ("--set", kv)]
    results = {int(s): run_seed(args, int(s), sets) for s in args.seeds.split(",")}
    rows, lines = tabulate(results)
    text = "\n".join(lines)
    print(text)
    (args.run / "seeds.md").write_text(text + "\n")
    (args.run / "seeds.json").write_text(json.dumps({"store": str(args.store), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
