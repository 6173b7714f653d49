"""Issue 26's table: `vacap eval shapes --json` outputs of both worlds, against its goals.

    python benchmarks/methods_table.py --priors priors-*.json --shapes shapes-*.json

Each file is one `vacap eval shapes --json` run (its settings compared with its own greedy, on
the same scenes). Per setting: CHAIR_s, CHAIR_i, the prior-driven CHAIR_i's excess over chance
and recall on the priors world, each with its change against greedy and the paired bootstrap
interval, and CHAIR_i's change on the shapes world. A setting meets the goal when, on the priors
world, CHAIR_i falls by at least 25 % and the excess by at least 40 %, recall by at most 2
points, and on the shapes world the interval of CHAIR_i's change does not lie above 0 (speed is
measured apart, by benchmarks/method_speed.py).
"""

from __future__ import annotations

import argparse
import json


def settings(paths: list[str]) -> dict[str, dict]:
    """Label -> result row, over several runs; greedy's row from the first run that has it."""
    rows: dict[str, dict] = {}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            run = json.load(f)
        if run["baseline"] != "greedy":
            # Its intervals would be against another setting: add greedy to that run's --methods.
            raise SystemExit(f"{path}: compared with {run['baseline']}, not greedy")
        for label, row in run["results"].items():
            rows.setdefault(label, row)
    return rows


def change(row: dict, key: str) -> str:
    diff = row.get(f"{key}_diff")
    if diff is None:
        return "-"
    return f"{diff[0] * 100:+.1f} [{diff[1] * 100:+.1f}, {diff[2] * 100:+.1f}]"


def goal(priors: dict, greedy: dict, shapes: dict | None) -> str:
    """The issue's bar for a preset, as 'yes' or what fails."""
    fails = []
    if priors["CHAIR_i"] > 0.75 * greedy["CHAIR_i"]:
        fails.append(f"CHAIR_i {priors['CHAIR_i'] / greedy['CHAIR_i'] - 1:+.0%}")
    if priors["CHAIR_i_prior_excess"] > 0.60 * greedy["CHAIR_i_prior_excess"]:
        fails.append(f"excess {priors['CHAIR_i_prior_excess'] / greedy['CHAIR_i_prior_excess'] - 1:+.0%}")
    if priors["recall"] < greedy["recall"] - 0.02:
        fails.append(f"recall {(priors['recall'] - greedy['recall']) * 100:+.1f}")
    if shapes is None:
        fails.append("no shapes run")
    elif shapes.get("CHAIR_i_diff") and shapes["CHAIR_i_diff"][1] > 0:
        fails.append("shapes CHAIR_i up")
    return "yes" if not fails else "no: " + ", ".join(fails)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--priors", nargs="+", required=True)
    parser.add_argument("--shapes", nargs="+", required=True)
    args = parser.parse_args()
    priors, shapes = settings(args.priors), settings(args.shapes)
    greedy = priors["greedy"]
    print(
        "| setting | CHAIR_s | CHAIR_i | change | excess | change | recall | change "
        "| shapes CHAIR_i | change | goal |\n|---|---:|---:|---|---:|---|---:|---|---:|---|---|"
    )
    for label, row in priors.items():
        other = shapes.get(label)
        cells = [
            f"{row['CHAIR_s'] * 100:.1f}", f"{row['CHAIR_i'] * 100:.1f}", change(row, "CHAIR_i"),
            f"{row['CHAIR_i_prior_excess'] * 100:.1f}", change(row, "CHAIR_i_prior_excess"),
            f"{row['recall'] * 100:.1f}", change(row, "recall"),
            f"{other['CHAIR_i'] * 100:.1f}" if other else "-", change(other, "CHAIR_i") if other else "-",
            "-" if label == "greedy" else goal(row, greedy, other),
        ]  # fmt: skip
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
