"""Render the results page (``docs/results.md``) from the figures the benchmarks saved.

Called by ``run_all.py``; every number on the page comes from a file in ``docs/_static/results/data``
written by a benchmark of this folder, and every sentence comparing methods is computed from
those numbers when the page is rendered.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd
from _data import SPLIT_TITLES

METHODS = ["ridge", "knn", "mclstexp", "spade"]
LABELS = {"ridge": "ridge (PCA features)", "knn": "kNN (features)", "mclstexp": "mclSTExp (defaults, frozen Lite0)",
          "spade": "SPADE (defaults)"}
PACKAGES = ["sq_spade", "torch", "numpy", "scikit-learn", "anndata", "spatialdata", "scanpy", "matplotlib", "dask"]
REL = "_static/results"  # figures, relative to docs/


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gb() -> float | None:
    try:
        kb = next(int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines()
                  if ln.startswith("MemTotal"))
        return kb / 2**20
    except (OSError, StopIteration):
        return None


def _git_sha(root: Path) -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _versions() -> str:
    out = []
    for p in PACKAGES:
        try:
            out.append(f"{p} {metadata.version(p)}")
        except metadata.PackageNotFoundError:
            pass
    return ", ".join(out)


def _table(df: pd.DataFrame, floatfmt: str = "{:.3f}") -> str:
    """A Markdown table (no tabulate dependency)."""
    cols = list(df.columns)
    lines = ["| " + " | ".join(str(c) for c in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in df.astype(object).itertuples(index=False):  # object: ints stay ints
        cells = []
        for v in row:
            if isinstance(v, float | np.floating):
                cells.append("" if np.isnan(v) else floatfmt.format(v))
            elif isinstance(v, int | np.integer):
                cells.append(f"{v:,}")
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# accuracy


def accuracy_summary(acc: pd.DataFrame) -> pd.DataFrame:
    """Mean over held-out sections per (split, method, seed), then mean and SD over seeds."""
    per_seed = acc.groupby(["split", "method", "seed"], sort=False)[["ACG", "HEG", "MSE", "MAE"]].mean()
    g = per_seed.groupby(["split", "method"], sort=False)
    out = g.mean().join(g.std(ddof=1).add_suffix("_sd")).join(g.size().rename("n_seeds"))
    return out.reset_index()


def _pm(mean: float, sd: float, n: int) -> str:
    if n > 1 and np.isfinite(sd) and sd > 0:
        return f"{mean:.3f} ± {sd:.3f}"
    return f"{mean:.3f}"


def headline_table(summary: pd.DataFrame) -> pd.DataFrame:
    rows = []
    methods = METHODS + [f"{m} (shuffled)" for m in METHODS]
    for m in methods:
        sub = summary[summary["method"] == m]
        if sub.empty:
            continue
        base = m.replace(" (shuffled)", "")
        row = {"method": LABELS.get(base, base) + (", shuffled labels" if "shuffled" in m else "")}
        for split in SPLIT_TITLES:
            s = sub[sub["split"] == split]
            for metric in ("ACG", "HEG"):
                row[f"{split} {metric}"] = ("" if s.empty else
                                            _pm(float(s[metric].iloc[0]), float(s[f"{metric}_sd"].iloc[0]),
                                                int(s["n_seeds"].iloc[0])))
        rows.append(row)
    return pd.DataFrame(rows)


def comparisons(summary: pd.DataFrame) -> list[str]:
    """Plain sentences: which method leads each split, where SPADE / mclSTExp fall short, controls."""
    out = []
    for split, title in SPLIT_TITLES.items():
        s = summary[summary["split"] == split].set_index("method")
        real = [m for m in METHODS if m in s.index]
        if not real:
            continue
        acg = s.loc[real, "ACG"]
        best = acg.idxmax()
        if out:
            out.append("")
        out.append(f"**{title}**: best mean ACG {acg[best]:.3f} by {LABELS[best]}; "
                   + ", ".join(f"{m} {acg[m]:.3f}" for m in real) + ".")
        for m, refs in (("spade", ("knn", "ridge")), ("mclstexp", ("ridge", "knn"))):
            if m not in acg:
                continue
            for r in refs:
                if r not in acg:
                    continue
                d = acg[m] - acg[r]
                verdict = "above" if d > 0 else "below"
                sd = s.loc[m, "ACG_sd"]
                out.append(f"- {LABELS[m]} is {verdict} {LABELS[r]} by {abs(d):.3f} ACG"
                           + (f" (SD over seeds {sd:.3f})" if np.isfinite(sd) else "") + ".")
        ctrl = [(m, acg[m] - s.loc[f"{m} (shuffled)", "ACG"]) for m in real if f"{m} (shuffled)" in s.index]
        if ctrl:
            out.append("- Margin over the same method trained on shuffled labels: "
                       + ", ".join(f"{m} {d:+.3f}" for m, d in ctrl) + " ACG.")
    return out


def accuracy_plot(summary: pd.DataFrame, path: Path) -> None:
    import matplotlib.pyplot as plt

    splits = [s for s in SPLIT_TITLES if s in set(summary["split"])]
    fig, ax = plt.subplots(figsize=(8.5, 4.0))
    width = 0.8 / len(METHODS)
    colors = plt.get_cmap("tab10").colors
    for j, m in enumerate(METHODS):
        for i, split in enumerate(splits):
            s = summary[(summary["split"] == split) & (summary["method"] == m)]
            c = summary[(summary["split"] == split) & (summary["method"] == f"{m} (shuffled)")]
            x = i + (j - (len(METHODS) - 1) / 2) * width
            if not s.empty:
                ax.bar(x, s["ACG"].iloc[0], width * 0.9, yerr=np.nan_to_num(s["ACG_sd"].iloc[0]),
                       color=colors[j], capsize=2, label=LABELS[m] if i == 0 else None)
            if not c.empty:
                ax.plot([x - width * 0.45, x + width * 0.45], [c["ACG"].iloc[0]] * 2, color="black", lw=1.2,
                        label="shuffled-label control" if (i == 0 and j == 0) else None)
    ax.set_xticks(range(len(splits)), [SPLIT_TITLES[s].split(",")[0] + "\n" + SPLIT_TITLES[s].split(", ", 1)[1].split(" (")[0]
                                       for s in splits])
    ax.axhline(0, color="0.5", lw=0.8)
    ax.set_ylabel("ACG (mean Pearson r, all genes)")
    ax.legend(frameon=False, fontsize="small", ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def gene_plot(genes: pd.DataFrame, path: Path) -> None:
    import matplotlib.pyplot as plt

    import sq_spade as sqs

    sub = genes[(genes["split"] == "loso") & genes["method"].isin(METHODS)]
    fig = sqs.pl.gene_correlation(sub, order=[m for m in METHODS if m in set(sub["method"])], return_fig=True,
                                  show=False, title="her2st leave-one-section-out: per-gene Pearson r "
                                                    "(mean over held-out sections and seeds)")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# scaling


def scaling_plot(sc: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    rows = pd.DataFrame(sc["rows"])
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.3))
    for col, label in (("patches_s", "patch extraction"), ("spade_train_s", f"SPADE training ({sc['epochs']} ep.)"),
                       ("mclstexp_train_s", f"mclSTExp training ({sc['epochs']} ep.)"),
                       ("spade_embed_s", "SPADE embedding"), ("spade_predict_s", "prediction (retrieval)")):
        a.plot(rows["spots"], rows[col], marker="o", label=label)
    n = rows["spots"].to_numpy(float)
    t0 = rows["spade_train_s"].iloc[0]
    a.plot(n, t0 * n / n[0], ls=":", color="0.5", label="linear from 1x")
    a.set(xscale="log", yscale="log", xlabel="spots", ylabel="seconds")
    a.legend(frameon=False, fontsize="x-small")
    b.plot(rows["spots"], rows["peak_rss_mb"] / 1024, marker="o", color="black")
    b.set(xscale="log", xlabel="spots", ylabel="peak RSS (GB)", ylim=(0, None))
    for ax in (a, b):  # label the measured sizes only (log-axis minor labels collide)
        ax.minorticks_off()
        ax.set_xticks(n, [f"{int(v):,}" for v in n])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# the page


def mutation_section(doc: dict) -> list[str]:
    """The results page's lines on the mutation score (``benchmarks/mutation.json``, written by ``make mutation``)."""
    killed, total = int(doc["killed"]), int(doc["total"])
    lines = ["## Mutation score\n",
             "How well the tests catch the bugs a user would hit: `benchmarks/mutation.py` (`make mutation`, not "
             "part of CI) plants each bug of a fixed list (a leaked reference or panel, an ignored argument or "
             "default, a shifted patch, a removed model-file check, the GPU-only averaging...) in a temporary "
             "copy of `src/`, one at a time, and runs the tests that cover that code. A bug is killed when they "
             "fail.\n",
             f"**{killed} of {total} mutations killed ({100 * killed / max(total, 1):.0f} %)**"
             + (f" in {doc['minutes']:.0f} minutes." if doc.get("minutes") is not None else ".") + "\n",
             "| class of bug | killed | planted |", "|---|---|---|"]
    for kind, v in doc["by_kind"].items():
        lines.append(f"| {kind} | {v['killed']} | {v['total']} |")
    lines.append("")
    survivors = doc.get("survivors") or []
    lines.append("Not killed: " + (", ".join(f"`{s}`" for s in survivors) if survivors else "none") + ".\n")
    return lines


def render(data: Path, out: Path, runs: dict, seeds: list[int]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    root = Path(__file__).resolve().parents[1]
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    mem = _memory_gb()
    machine = (f"{_cpu_model()}, {os.cpu_count()} cores"
               + (f", {mem:.0f} GB RAM" if mem else "") + f", {platform.system()} {platform.release()}")
    feats = _read_json(data / "features.json")
    gpu_line = ("no GPU: every figure on this page is from the CPU"
                if not feats or "cuda" not in str(feats.get("device")) else f"GPU: {feats['device']}")
    L: list[str] = []
    add = L.append
    add("# Results\n")
    add("Every number on this page was measured by the scripts in `benchmarks/` and is regenerated, with the "
        "page, by one command (`make bench`, i.e. `python benchmarks/run_all.py`; about 30 minutes on 2 cores).\n")
    add(f"- **Date**: {now}; commit `{_git_sha(root)}`")
    add(f"- **Machine**: {machine}; {gpu_line}")
    add(f"- **Versions**: Python {platform.python_version()}, {_versions()}")
    add(f"- **Seeds**: {', '.join(map(str, seeds))} (accuracy; shuffled-label controls on seed {seeds[0]}); "
        "backbone EfficientNet-Lite0 with ImageNet weights (frozen), 112 µm patches at 0.5 µm/px")
    add("- **Data**: her2st sections A1, A2, B4, C2, C3, C4 (Andersson et al. 2021) and STUtility MOB1-3, "
        "read from `SQ_SPADE_DATA_DIR`\n")

    acc_path, genes_path = data / "accuracy.csv", data / "accuracy_genes.csv"
    summary = None
    if acc_path.exists():
        acc = pd.read_csv(acc_path)
        summary = accuracy_summary(acc)
        add("## Expression prediction accuracy\n")
        add("Mean over held-out sections of ACG (mean Pearson r between predicted and observed log1p CP10k "
            "expression across spots, over all panel genes) and HEG (the same over the panel's 50 most "
            "expressed genes), ± the SD over seeds. The gene panel (the 50 most variable genes, as SPADE) is "
            "chosen on each fold's training sections only; mclSTExp and SPADE stop early on the last training "
            "section and retrieve from all training sections (k = 200); ridge and kNN choose their penalty "
            "and k by cross-validation over the training sections. Nothing is tuned on a test section. "
            "*Shuffled labels*: the same method trained on the training sections with expression rows "
            "permuted within each section (image and expression no longer paired): the floor a method must "
            "clear.\n")
        add(_table(headline_table(summary)) + "\n")
        add("Ridge and kNN do not depend on the seed (no spread shown); controls ran on the first seed.\n")
        add(f"![Accuracy per split]({REL}/accuracy.png)\n")
        accuracy_plot(summary, out / "accuracy.png")
        add("### What the numbers say\n")
        L.extend(comparisons(summary))
        add("")
        add("### Per held-out section (mean over seeds)\n")
        per = (acc[~acc["method"].str.contains("shuffled")]
               .groupby(["split", "section", "method"], sort=False)[["ACG", "HEG", "MSE", "MAE", "n_genes"]].mean()
               .reset_index())
        per["n_genes"] = per["n_genes"].round().astype(int)
        add(_table(per) + "\n")
        if genes_path.exists():
            gene_plot(pd.read_csv(genes_path), out / "gene_correlation.png")
            add("### Per gene\n")
            add("`sq_spade.pl.gene_correlation` of the leave-one-section-out folds: each method's genes ranked "
                "by Pearson r (left) and their distribution (right).\n")
            add(f"![Per-gene correlation]({REL}/gene_correlation.png)\n")

    figs = _read_json(out / "figures.json")
    if figs:
        add("### On the tissue\n")
        add(f"One fold drawn with `sq_spade.pl` ({figs['fold']}, seed {figs['seed']}): C4's four best-predicted "
            "genes by SPADE, observed next to predicted ("
            + ", ".join(f"{g} r = {r:.2f}" for g, r in zip(figs["genes"], figs["pearson_r"], strict=True))
            + "); each spot's expert; the embedding of all four sections; the training curves.\n")
        for name, alt in (("spatial_C4", "observed and predicted genes on C4"), ("experts_C4", "experts on C4"),
                          ("embedding", "UMAP of the SPADE embedding"), ("history", "SPADE training history")):
            add(f"![{alt}]({REL}/{name}.png)\n")

    fs = _read_json(data / "few_shot.json")
    if fs:
        add("## Few-shot tissue classification on A1\n")
        add(f"SPADE and mclSTExp trained on B4, C2, C3 (C4 validation: other patients than A1), then A1 embedded. "
            f"k labelled spots per pathologist class, logistic regression, tested on the other labelled spots; "
            f"{fs['repeats']} repeats. {fs['n_labelled']} labelled spots: "
            + ", ".join(f"{k} {v}" for k, v in fs["classes"].items()) + ".\n")
        rows = pd.DataFrame(fs["rows"])
        cell = {}
        for r in rows.itertuples(index=False):
            cell.setdefault(r.embedding, {})[f"{r.shots} shots"] = (
                f"{r.balanced_accuracy_mean:.2f} ± {r.balanced_accuracy_std:.2f}")
        names = {"X_spade": "SPADE embedding", "X_mclstexp": "mclSTExp embedding",
                 "X_efficientnet_lite0": "Lite0 features (no training)"}
        t = pd.DataFrame([{"embedding": names.get(k, k), **v} for k, v in cell.items()])
        add("Balanced accuracy, mean ± SD over repeats:\n")
        add(_table(t) + "\n")

    add("## Speed and memory\n")
    add(f"Hardware for every row: {machine}; {gpu_line}. Each benchmark runs in its own process.\n")
    rows = []
    p = _read_json(data / "patches.json")
    if p:
        rows += [("patches/s, her2st C2, 224 px at 0.5 µm/px (resampled)", f"{p['c2_resampled_patches_per_s']:,.0f}",
                  "bench_patches.py"),
                 ("patches/s, her2st C2, 224 px native", f"{p['c2_native_patches_per_s']:,.0f}", "bench_patches.py"),
                 (f"peak RSS increase, 12,000² px synthetic level ({p['synthetic_level_mb']:.0f} MB)",
                  f"{p['synthetic_rss_increase_mb']:.0f} MB "
                  f"({p['synthetic_rss_increase_mb'] / p['synthetic_level_mb']:.2f}× the level)", "bench_patches.py")]
    if feats:
        rows += [(f"{feats['backbone']} bare forward, batch {feats['batch_size']} ({feats['device']})",
                  f"{feats['bare_img_per_s']:.1f} img/s", "bench_features.py"),
                 ("whole path image → obsm (`pp.compute_features`)",
                  f"{feats['whole_img_per_s']:.1f} img/s ({feats['ratio']:.1%} of bare)", "bench_features.py")]
    ex = _read_json(data / "experts.json")
    if ex:
        key = f"stacked_{ex['epochs']}_epochs_s"
        rows += [(f"SPADE experts: {ex['experts']} × {ex['epochs']} epochs, {ex['n']:,} spots, 1,280-d",
                  f"{ex[key]:.0f} s (one loop per expert: {ex['loop_projected_s']:.0f} s projected)",
                  "bench_experts.py"),
                 (f"SPADE embedding of {ex['n']:,} spots (soft routing)", f"{ex['embed_soft_s']:.2f} s",
                  "bench_experts.py")]
    if rows:
        add(_table(pd.DataFrame(rows, columns=["figure", "value", "script"])) + "\n")
    add("The whole path includes reading the section's image level (about 1.5 s, a sizeable share of a "
        "187-spot section). Out-of-core figures (40,000 px slides, a 1M-spot feature store, checkpoints, "
        "torchrun) are on the {doc}`scale` page.\n")
    add("GPU figures: not measured here (no GPU was lent to the sessions that produced this page); "
        "`bench_features.py --device cuda` measures them where one is present.\n")

    sc = _read_json(data / "scaling.json")
    if sc:
        add("## Scaling with the number of spots\n")
        add(f"A synthetic section the size of a Visium section under tissue, enlarged to 4× and 16× its spots "
            f"(same pitch, larger image); each size in a fresh process; {sc['epochs']} training epochs; "
            "frozen features are 1,280-d random stand-ins (backbone cost is linear in spots, see above); "
            "prediction is of one 1× query section from the enlarged table as reference.\n")
        t = pd.DataFrame(sc["rows"])[["factor", "spots", "patches_s", "spade_train_s", "spade_embed_s",
                                      "mclstexp_train_s", "spade_predict_s", "peak_rss_mb"]]
        t["peak_rss_mb"] = t["peak_rss_mb"].round().astype(int)
        t.columns = ["×", "spots", "patches (s)", "SPADE train (s)", "SPADE embed (s)", "mclSTExp train (s)",
                     "predict 1× query (s)", "peak RSS (MB)"]
        add(_table(t, "{:.1f}") + "\n")
        scaling_plot(sc, out / "scaling.png")
        add(f"![Scaling]({REL}/scaling.png)\n")
        r = pd.DataFrame(sc["rows"]).sort_values("spots")
        if len(r) > 1:
            a, b = r.iloc[0], r.iloc[-1]
            grow = b["spots"] / a["spots"]
            parts = [f"{name} {b[col] / a[col]:.1f}×" for col, name in (
                ("patches_s", "patches"), ("spade_train_s", "SPADE training"), ("spade_embed_s", "embedding"),
                ("mclstexp_train_s", "mclSTExp training"), ("spade_predict_s", "prediction"),
                ("peak_rss_mb", "peak RSS"))]
            add(f"From {int(a['spots']):,} to {int(b['spots']):,} spots ({grow:.0f}× the work): "
                + ", ".join(parts) + ".\n")

    mutation = _read_json(root / "benchmarks" / "mutation.json")
    if mutation:
        L.extend(mutation_section(mutation))

    add("## Where results fall short, and why they differ from the papers\n")
    add("- The papers report SPADE and mclSTExp above the regression and retrieval references on her2st. Here, "
        "with frozen ImageNet EfficientNet-Lite0 features (the pathology foundation weights the papers used, "
        "UNI and others, cannot be had offline in this project) and about 450-1,000 training spots per fold, "
        "the learned 256-d spaces overfit: their training loss keeps falling while the validation loss rises "
        "after a few tens of epochs. The comparisons above say plainly where each method lands.")
    add("- her2st C2, C3 and C4 are serial sections of one tumour: leave-one-section-out is optimistic; the "
        "patient split is the honest one, and there A1/A2 images are 3.2 µm/px downscaled copies (patches are "
        "upsampled to 0.5 µm/px), which costs every image-based method.")
    add("- mclSTExp's published figures fine-tune the image encoder on a GPU; the rows here are the frozen-feature "
        "variant (no GPU was available); SPADE's default mixture has one expert per 2,000 training spots, so one "
        "expert on these few hundred spots (the published 16 are one argument away: `n_experts=16`).")
    add("- Seeds change only the learned methods (ridge and kNN are deterministic given the data).\n")

    add("## How each part was produced\n")
    rr = [(k, f"`{v['command']}`", f"{v['wall_s']:.0f}", "ok" if v["rc"] == 0 else f"failed ({v['rc']})")
          for k, v in runs.items()]
    if rr:
        add(f"Total {sum(v['wall_s'] for v in runs.values()) / 60:.0f} minutes of benchmarks on this machine.\n")
        add(_table(pd.DataFrame(rr, columns=["step", "command", "wall time (s)", "status"])) + "\n")
    return "\n".join(L) + "\n"
