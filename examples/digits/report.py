"""The classic experiment's tables (Markdown) and lambda plot."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .runner import fmt


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def format_report(results: Mapping[str, Any]) -> str:
    """The results as Markdown tables (accuracies in %, on the test split)."""
    cfg = results["config"]
    neg = results["negation"]
    lines = [
        f"# Task arithmetic on digits: `{results['command']}`",
        "",
        f"Test accuracy in % (train/val/test = {results['data']['train']}/"
        f"{results['data']['val']}/{results['data']['test']} images per view). Lambda is "
        "always chosen on the validation split.",
        "",
        f"## Negation (control: upright digits; lambda in 0..{cfg['negation_lambdas'][-1]:g} "
        f"keeping validation control accuracy >= {cfg['control_ratio']:.0%} of the "
        "pre-trained model's)",
        "",
    ]
    names = {"pretrained": "Pre-trained", "finetuned": "Fine-tuned", "random": "Random vector"}
    names["negated"] = "Negative task vector"
    lines += md_table(
        ["Method", "Target (avg)", "Control (avg)"],
        [[names[m], pct(v["target"]), pct(v["control"])] for m, v in neg["summary"].items()],
    )
    lines.append("")
    header = ["Target", "Pre-trained", "Fine-tuned", "Negated: lambda", "target", "control"]
    if cfg["random_baseline"]:
        header += ["Random: lambda", "target", "control"]
    rows = []
    for r in neg["rows"]:
        row = [
            r["target"],
            f"{pct(r['pretrained']['target'])} / {pct(r['pretrained']['control'])}",
            f"{pct(r['finetuned']['target'])} / {pct(r['finetuned']['control'])}",
            fmt(r["negated"]["lambda"]),
            pct(r["negated"]["target"]),
            pct(r["negated"]["control"]),
        ]
        if cfg["random_baseline"]:
            rnd = r["random"]
            row += [fmt(rnd["lambda"]), pct(rnd["target"]), pct(rnd["control"])]
        rows.append(row)
    lines += ["(Pre-trained and fine-tuned columns: target / control.)", ""]
    lines += md_table(header, rows)

    add = results["addition"]
    lines += ["", "## Addition (normalised accuracy = accuracy / fine-tuned accuracy)", ""]
    lines += md_table(
        ["Tasks added", "Subsets", "Mean accuracy", "Mean normalised", "Worst normalised"],
        [
            [
                str(s["tasks"]),
                str(s["subsets"]),
                pct(s["mean_accuracy"]),
                pct(s["mean_normalized"]),
                pct(s["min_normalized"]),
            ]
            for s in add["by_size"]
        ],
    )
    all_tasks = add["all"]
    lines += ["", f"All {len(all_tasks['tasks'])} tasks, lambda = {fmt(all_tasks['lambda'])}:", ""]
    lines += md_table(
        ["Task", "Pre-trained", "Fine-tuned", "Multi-task", "Normalised"],
        [
            [
                n,
                pct(results["pretrained"][f"{n}_test"]),
                pct(results["finetuned"][n]["test"]),
                pct(all_tasks["accuracy"][n]),
                pct(all_tasks["normalized"][n]),
            ]
            for n in all_tasks["tasks"]
        ],
    )

    lines += [
        "",
        "## Analogy (tau_D ~ tau_C + (tau_B - tau_A); no D data used; lambda chosen on B and "
        "C validation)",
        "",
    ]
    lines += md_table(
        [
            "A : B :: C : D",
            "Chance",
            "Pre-trained",
            "Analogy (lambda)",
            "tau_B alone",
            "Fine-tuned on D",
        ],
        [
            [
                f"{r['A']} : {r['B']} :: {r['C']} : {r['D']}",
                pct(r["chance"]),
                pct(r["pretrained"]),
                f"{pct(r['analogy'])} ({fmt(r['lambda'])})",
                pct(r["b_only"]),
                pct(r["finetuned_on_d"]),
            ]
            for r in results["analogy"]
        ],
    )

    dec = results["decomposition"]
    lines += ["", "## Shared/unique decomposition (`streamvec decompose`)", ""]
    if dec is None:
        lines.append("Not run in this mode (`--quick`).")
    else:
        lines += [
            "Multi-task merging: the shared components of all task vectors added as extra "
            "task vectors (`pre + lambda (sum tau_i + sum shared_i)`), against the plain sum.",
            "",
        ]
        plain = dec["tasks_only"]
        table = [
            [
                "sum of tau_i",
                "",
                "",
                fmt(plain["lambda"]),
                pct(plain["mean_normalized"]),
                pct(min(plain["normalized"].values())),
            ]
        ]
        for m in dec["merge"]:
            x = m["with_shared"]
            dims = ", ".join(f"{k} {v}" for k, v in m["shared_dims"].items())
            share = np.mean(list(m["shared_share"].values()))
            table.append(
                [
                    f"+ sum of shared_i (rank {m['rank']}, threshold {fmt(m['threshold'])})",
                    dims,
                    pct(share),
                    fmt(x["lambda"]),
                    pct(x["mean_normalized"]),
                    pct(min(x["normalized"].values())),
                ]
            )
        lines += md_table(
            [
                "All tasks added",
                "Shared dims",
                "Shared % of norm^2",
                "lambda",
                "Mean normalised",
                "Worst normalised",
            ],
            table,
        )
        lines += [
            "",
            "Forgetting: each target's vector decomposed with the vector of a fine-tune on the "
            "control task (upright digits; rank 16, threshold 0.85); only the unique part "
            "negated, under the same control constraint.",
            "",
        ]
        lines += md_table(
            [
                "Negated",
                "Shared dims",
                "Shared % of norm^2",
                "Full tau: lambda",
                "target",
                "control",
                "Unique only: lambda",
                "target",
                "control",
            ],
            [
                [
                    r["target"],
                    ", ".join(f"{k} {v}" for k, v in r["shared_dims"].items()),
                    pct(r["shared_share"]),
                    fmt(r["full"]["lambda"]),
                    pct(r["full"]["target"]),
                    pct(r["full"]["control"]),
                    fmt(r["unique"]["lambda"]),
                    pct(r["unique"]["target"]),
                    pct(r["unique"]["control"]),
                ]
                for r in dec["negation"]
            ],
        )
    secs = results["seconds"]
    lines += [
        "",
        f"{results['streamvec_commands']} streamvec commands ({secs['streamvec_commands']:.1f} s); "
        f"total {secs['total']:.0f} s.",
        "",
    ]
    return "\n".join(lines)


def write_plot(results: Mapping[str, Any], path: Path) -> str | None:
    """Accuracy against lambda (test split) for each operation; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    for row in results["negation"]["rows"]:
        lams = [p["lambda"] for p in row["curve"]]
        (line,) = ax.plot(lams, [100 * p["target_test"] for p in row["curve"]], label=row["target"])
        ax.plot(lams, [100 * p["control_test"] for p in row["curve"]], "--", color=line.get_color())
        ax.axvline(row["negated"]["lambda"], color=line.get_color(), alpha=0.3, lw=1)
    ax.set(title="Negation: target (solid), control (dashed)", xlabel="lambda", ylabel="accuracy %")
    ax.legend(fontsize=8)
    ax = axes[1]
    all_tasks = results["addition"]["all"]
    for n in all_tasks["tasks"]:
        curve = all_tasks["curve"]
        ax.plot([p["lambda"] for p in curve], [100 * p[n] for p in curve], label=n)
    ax.axvline(all_tasks["lambda"], color="grey", alpha=0.5, lw=1)
    ax.set(
        title=f"Addition of all {len(all_tasks['tasks'])} task vectors",
        xlabel="lambda",
        ylabel="normalised accuracy %",
    )
    ax.legend(fontsize=8)
    ax = axes[2]
    for row in results["analogy"]:
        curve = row["curve"]
        (line,) = ax.plot(
            [p["lambda"] for p in curve],
            [100 * p["d_test"] for p in curve],
            label=f"D = {row['D']}",
        )
        ax.axhline(100 * row["finetuned_on_d"], color=line.get_color(), ls=":", lw=1)
        ax.axvline(row["lambda"], color=line.get_color(), alpha=0.3, lw=1)
    ax.axhline(100 * results["analogy"][0]["chance"], color="grey", ls="--", lw=1, label="chance")
    ax.set(title="Analogy C + (B - A): accuracy on D", xlabel="lambda", ylabel="accuracy %")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
