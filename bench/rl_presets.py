"""The README's RL preset table: each preset refines the default student for the same steps.

    .venv/bin/python bench/rl_presets.py [--student artifacts/student] [--work artifacts/work] \
        [--out artifacts/rl] [--steps 30] [--learning-rate 2e-3]

Runs `answerfirst rl --preset P` for grpo, grpo-sft and elastic-sft on the default run's teacher
labels (WORK/summary.json names them), then prints one Markdown row per preset from each run's
metrics.jsonl: held-out reward, NDCG@10, grade entropy and KL to the starting student at the last
evaluation, and the mean explanation reward of the last five steps. The start values are those of
the first evaluation (step 0), the same for every preset.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

PRESETS = ("grpo", "grpo-sft", "elastic-sft")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", default="artifacts/student")
    parser.add_argument("--work", default="artifacts/work")
    parser.add_argument("--out", default="artifacts/rl")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--learning-rate", default="2e-3")
    args = parser.parse_args()
    labels = json.loads((Path(args.work) / "summary.json").read_text(encoding="utf-8"))["labels"]
    rows = {}
    for preset in PRESETS:
        out = Path(args.out) / preset
        if not (out / "answerfirst.json").is_file():
            subprocess.run([sys.executable, "-m", "answerfirst.cli", "rl", "--student", args.student, "--data", labels,
                            "--out", str(out), "--preset", preset, "--steps", str(args.steps),
                            "--learning-rate", args.learning_rate], check=True)
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
        evals = [r for r in records if "heldout_reward" in r]
        steps = [r for r in records if "reward_explanation" in r]
        rows[preset] = (evals[0], evals[-1], sum(r["reward_explanation"] for r in steps[-5:]) / len(steps[-5:]))
    start = rows[PRESETS[0]][0]
    print(f"| preset | held-out reward (start {start['heldout_reward']:.3f}) | NDCG@10 (start {start['heldout_ndcg10_gold']:.3f}) "
          f"| grade entropy (start {start['heldout_entropy']:.2f}) | explanation reward, last 5 steps | KL to start |")
    print("| --- | --- | --- | --- | --- | --- |")
    for preset, (_, last, explanation) in rows.items():
        print(f"| {preset} | {last['heldout_reward']:.3f} | {last['heldout_ndcg10_gold']:.3f} | {last['heldout_entropy']:.2f} "
              f"| {explanation:.2f} | {last['heldout_kl_ref']:.2f} |")


if __name__ == "__main__":
    main()
