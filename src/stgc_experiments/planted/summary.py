"""From the runs in results/planted/runs: per cell and arm the figures, the paired intervals, a table,
the regime map and the detection ROC."""

import json
from pathlib import Path
from typing import Any

import numpy as np

from stgc_experiments.planted.meter import VARIANTS
from stgc_experiments.study import paired_interval

ROLES = ("baseline", "stgc", "random", "oracle")  # the main comparison of a cell
OWN_VARIANT = "exact/all"  # the arms' own cosine (STGC's defaults)
FIGURES = (
    "accuracy",
    "accuracy_planted",
    "accuracy_base",
    "purity",  # the minimal level's
    "planted_split",  # the pipeline level's
    "reroute_rate_planted",
    "reroute_rate_other",
    "flag_persistence",
    "grad_mass_planted",
)


def role_names(chosen: str) -> dict[str, str]:
    """Arm names (run.Arm.name) of each role, for the chosen setting (e.g. "unlikelihood_lw1")."""
    return {
        "baseline": "baseline",
        "stgc": chosen,
        "random": f"{chosen}_random",
        "oracle": f"{chosen}_oracle",
    }


def load_runs(out: Path) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """cell name -> arm name -> the runs, by seed."""
    runs: dict[str, dict[str, list]] = {}
    for path in sorted((out / "runs").glob("*/*/seed*.json")):
        run = json.loads(path.read_text())
        runs.setdefault(path.parts[-3], {}).setdefault(path.parts[-2], []).append(run)
    for arms in runs.values():
        for seeds in arms.values():
            seeds.sort(key=lambda run: run["seed"])
    return runs


def bits(run: dict[str, Any]) -> list[bool]:
    return [c == "1" for c in run["correct"]]


def paired(reference: list[dict], runs: list[dict]) -> dict[str, float] | None:
    """The runs' accuracy minus the reference's over the seeds both have, with a seed-level interval."""
    by_seed = {run["seed"]: run for run in reference}
    pairs = [(by_seed[run["seed"]], run) for run in runs if run["seed"] in by_seed]
    if not pairs:
        return None
    return paired_interval([bits(a) for a, _ in pairs], [bits(b) for _, b in pairs])


def mean_of(runs: list[dict], get) -> float | None:
    values = [v for v in map(get, runs) if v is not None]
    return float(np.mean(values)) if values else None


def arm_figures(runs: list[dict], baseline: list[dict], random: list[dict]) -> dict[str, Any]:
    """One arm's means over its seeds, and its paired differences to the baseline and the random arm."""
    own = lambda key: lambda run: run["detection"][OWN_VARIANT][key]  # noqa: E731
    figures = {
        "name": runs[0]["arm"]["name"],
        "seeds": [run["seed"] for run in runs],
        "metric": mean_of(runs, lambda run: run["accuracy"]),
        "detection_auc": mean_of(runs, own("auc")),
        "precision": mean_of(runs, own("precision")),
        "recall": mean_of(runs, own("recall")),
        "planted_rate": mean_of(runs, own("planted_rate")),
        "flagged_rate": mean_of(runs, own("flagged_rate")),
        **{key: mean_of(runs, lambda run, key=key: run.get(key)) for key in FIGURES},
        "detection": {
            variant: {
                key: mean_of(runs, lambda run, v=variant, k=key: run["detection"][v][k])
                for key in ("auc", "precision", "recall")
            }
            for variant in VARIANTS
        },
        "delta_vs_baseline": paired(baseline, runs),
        "delta_vs_random": paired(random, runs) if random else None,
    }
    return figures


def settings_of(runs: dict[str, dict[str, list]]) -> list[str]:
    """The loss settings a main comparison ran for (each has an oracle arm), in name order."""
    oracle = "_oracle"
    return sorted({name[: -len(oracle)] for arms in runs.values() for name in arms if name.endswith(oracle)})


def summarize(out: Path, chosen: str) -> dict[str, Any]:
    """summary.json's content: per cell and loss setting the four roles' figures (those that have runs);
    `chosen` is the screen's choice, the other settings were run beside it."""
    runs = load_runs(out)
    settings = settings_of(runs)
    cells = {}
    for cell, arms in runs.items():
        if "baseline" not in arms:
            continue
        by_setting = {}
        for setting in settings:
            names = role_names(setting)
            by_setting[setting] = {
                role: arm_figures(arms[name], arms["baseline"], arms.get(names["random"], []))
                for role, name in names.items()
                if name in arms
            }
        cells[cell] = {"cell": arms["baseline"][0]["cell"], "settings": by_setting}
    return {"chosen": chosen, "settings": settings, "metric": "test accuracy", "cells": cells}


def fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def interval(delta: dict[str, float] | None) -> str:
    return "–" if delta is None else f"{delta['mean']:+.4f} [{delta['low']:+.4f}, {delta['high']:+.4f}]"


def table(summary: dict[str, Any]) -> str:
    """The markdown table of every cell, setting and role (the baseline once per cell)."""
    header = (
        "| cell | setting | arm | seeds | test acc | planted acc | AUC | precision | recall "
        "| reroute planted / other | purity | Δ vs baseline [95% CI] | Δ vs random [95% CI] |"
    )
    lines = [header, "|" + " --- |" * (header.count("|") - 1)]
    for cell_name, cell in summary["cells"].items():
        for index, (setting, roles) in enumerate(cell["settings"].items()):
            for role, arm in roles.items():
                if role == "baseline" and index:
                    continue
                reroute = f"{fmt(arm['reroute_rate_planted'])} / {fmt(arm['reroute_rate_other'])}"
                lines.append(
                    f"| {cell_name} | {'–' if role == 'baseline' else setting} | {role} | {len(arm['seeds'])} | "
                    f"{fmt(arm['metric'], 4)} | {fmt(arm['accuracy_planted'])} | {fmt(arm['detection_auc'])} | "
                    f"{fmt(arm['precision'])} | {fmt(arm['recall'])} | {reroute} | {fmt(arm['purity'])} | "
                    f"{interval(arm['delta_vs_baseline']) if role != 'baseline' else '–'} | "
                    f"{interval(arm['delta_vs_random']) if role in ('stgc', 'oracle') else '–'} |"
                )
    return "\n".join(lines)


def tally(summary: dict[str, Any], setting: str, role: str, key: str) -> dict[str, int]:
    """Over the cells: how many times the interval of `role`'s `key` (e.g. STGC's delta_vs_random) lies
    above zero (wins), straddles it (ties) or lies below (loses)."""
    counts = {"wins": 0, "ties": 0, "loses": 0}
    for cell in summary["cells"].values():
        delta = cell["settings"].get(setting, {}).get(role, {}).get(key)
        if delta is not None:
            counts["wins" if delta["low"] > 0 else "loses" if delta["high"] < 0 else "ties"] += 1
    return counts


def tallies(summary: dict[str, Any]) -> list[str]:
    """A line per loss setting: over the cells, how often STGC and the oracle win, tie or lose."""
    lines = []
    for setting in summary["settings"]:
        counts = {label: tally(summary, setting, role, key) for label, role, key in (
            ("STGC − random", "stgc", "delta_vs_random"), ("STGC − baseline", "stgc", "delta_vs_baseline"),
            ("oracle − baseline", "oracle", "delta_vs_baseline"))}  # fmt: skip
        lines.append(f"- `{setting}`, over {sum(counts['STGC − random'].values())} cells: " + "; ".join(
            f"{label} wins {c['wins']}, ties {c['ties']}, loses {c['loses']}" for label, c in counts.items()
        ) + ".")  # fmt: skip
    return lines


def results_body(summary: dict[str, Any]) -> list[str]:
    """results.md's common part: the tallies, the table of every cell and arm, detection by variant."""
    return [
        *tallies(summary),
        "",
        table(summary),
        "",
        "Detection by cosine variant (AUC / precision / recall), baseline arm:",
        "",
        *variant_table(summary),
    ]


def variant_table(summary: dict[str, Any]) -> list[str]:
    """Per cell, the baseline arm's detection by every cosine variant: AUC / precision / recall."""
    lines = ["| cell | " + " | ".join(VARIANTS) + " |", "| --- |" + " --- |" * len(VARIANTS)]
    for name, cell in summary["cells"].items():
        baseline = next(
            (roles["baseline"] for roles in cell["settings"].values() if "baseline" in roles), None
        )
        if baseline:
            lines.append(f"| {name} | " + " | ".join(
                f"{fmt(d['auc'])} / {fmt(d['precision'])} / {fmt(d['recall'])}" for d in baseline["detection"].values()
            ) + " |")  # fmt: skip
    return lines


def readme_table(summary: dict[str, Any], shown: list[str]) -> str:
    """The README's part: per shown cell and setting STGC − baseline, STGC − random, oracle − baseline and
    the AUC of STGC's cosine (baseline arm)."""
    lines = [
        "| cell | setting | seeds | baseline acc | STGC − baseline | STGC − random | oracle − baseline | AUC |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in shown:
        for setting, arms in summary["cells"].get(name, {}).get("settings", {}).items():
            if "stgc" not in arms:
                continue
            oracle = arms.get("oracle", {}).get("delta_vs_baseline")
            lines.append(
                f"| {name} | {setting} | {len(arms['stgc']['seeds'])} | {fmt(arms['baseline']['metric'], 4)} | "
                f"{interval(arms['stgc']['delta_vs_baseline'])} | {interval(arms['stgc']['delta_vs_random'])} | "
                f"{interval(oracle)} | {fmt(arms['baseline']['detection_auc'])} |"
            )
    return "\n".join(lines)


def write_readme_section(readme: Path, markers: tuple[str, str], section: str) -> None:
    """Replace the text between the README's two markers with `section`."""
    text = readme.read_text()
    start, end = markers
    if start not in text or end not in text:
        raise SystemExit(f"{readme} lacks the markers {markers}")
    head, rest = text.split(start)
    _, tail = rest.split(end)
    readme.write_text(f"{head}{start}\n{section}\n{end}{tail}")


def regime_map(summary: dict[str, Any], center: str, path: Path) -> None:
    """STGC − baseline, STGC − random and oracle − baseline per cell: a row of panels per loss setting,
    a panel per factor varied from the center cell (the center in every panel)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells, settings = summary["cells"], summary["settings"]
    if center not in cells or not settings:
        return
    middle = cells[center]["cell"]
    factors = ("planted_share", "experts", "top_k", "families")
    figure, axes = plt.subplots(
        len(settings),
        len(factors),
        figsize=(4 * len(factors), 3.4 * len(settings)),
        sharey="row",
        squeeze=False,
    )
    series = (("stgc", "delta_vs_baseline", "STGC − baseline"), ("stgc", "delta_vs_random", "STGC − random"),
              ("oracle", "delta_vs_baseline", "oracle − baseline"))  # fmt: skip
    for axes_row, setting in zip(axes, settings, strict=True):
        for axis, factor in zip(axes_row, factors, strict=True):
            row = sorted(
                ((cell["cell"][factor], cell["settings"].get(setting, {})) for cell in cells.values()
                 if cell["cell"]["construction"] == middle["construction"]
                 and all(cell["cell"][f] == middle[f] for f in factors if f != factor)),
                key=lambda item: item[0],
            )  # fmt: skip
            for offset, (role, key, label) in zip((-0.15, 0.0, 0.15), series, strict=True):
                points = [(i + offset, roles[role][key]) for i, (_, roles) in enumerate(row)
                          if role in roles and roles[role][key] is not None]  # fmt: skip
                if points:
                    mean = np.array([p[1]["mean"] for p in points])
                    errors = np.array(
                        [[p[1]["mean"] - p[1]["low"], p[1]["high"] - p[1]["mean"]] for p in points]
                    ).T
                    axis.errorbar([p[0] for p in points], mean, yerr=errors, fmt="o", capsize=3, label=label)
            axis.axhline(0, color="grey", linewidth=0.8)
            axis.set_xticks(range(len(row)), [f"{value:g}" for value, _ in row])
            axis.set_xlabel(factor.replace("_", " "))
            axis.set_title(f"{setting}: varying {factor.replace('_', ' ')}", fontsize=9)
        axes_row[0].set_ylabel("Δ test accuracy, 95% CI")
    axes[0][0].legend(fontsize=8)
    figure.suptitle(f"Planted conflict ({middle['construction']}): the regime map around {center}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def roc_figure(runs: dict[str, dict[str, list]], cells: list[str], path: Path) -> None:
    """The detection ROC of each cosine variant in the baseline arm (λ = 0: routing untouched by the CEL),
    pooled over seeds; a panel per cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [cell for cell in cells if "baseline" in runs.get(cell, {})]
    if not cells:
        return
    figure, axes = plt.subplots(1, len(cells), figsize=(max(4.2 * len(cells), 6.5), 4), squeeze=False)
    for axis, cell in zip(axes[0], cells, strict=True):
        for variant in VARIANTS:
            histograms = sum(
                np.asarray(run["histograms"][variant], dtype=float) for run in runs[cell]["baseline"]
            )
            other, planted = histograms  # (bins,) each, by ascending cosine
            tpr = np.concatenate(
                [[0], np.cumsum(planted) / max(planted.sum(), 1)]
            )  # flagged below a threshold
            fpr = np.concatenate([[0], np.cumsum(other) / max(other.sum(), 1)])
            auc = np.trapezoid(tpr, fpr)
            axis.plot(fpr, tpr, label=f"{variant} (AUC {auc:.2f})")
        axis.plot([0, 1], [0, 1], color="grey", linewidth=0.8, linestyle="--")
        axis.set_xlabel("other pairs flagged")
        axis.set_ylabel("planted pairs flagged")
        axis.set_title(cell, fontsize=9)
        axis.legend(fontsize=7, loc="lower right")
    figure.suptitle("Does a low cosine find the planted pairs? (baseline arm, all seeds)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
