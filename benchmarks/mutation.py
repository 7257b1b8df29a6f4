"""Mutation score: plant small realistic bugs in the source, one at a time, and see whether the tests catch them.

Each mutation of :data:`MUTATIONS` replaces one source snippet (which must occur exactly once
in its file) in a temporary copy of ``src/``, then runs the tests that cover that code against
the copy (``PYTHONPATH`` points at it; the repository is not touched). A mutation is *killed*
when those tests fail, and *survives* when they pass. The list is fixed and targeted: each
entry is a bug a user could ship (a leaked reference, an ignored argument, a shifted patch, a
removed integrity check...), grouped by the classes of issue 18; ``tests/test_mutation_list.py``
checks that every snippet still occurs exactly once, so the list cannot go stale silently.

Usage (from the repository root; ``make mutation`` runs the first)::

    .venv/bin/python benchmarks/mutation.py                 # all; writes benchmarks/mutation.json
    .venv/bin/python benchmarks/mutation.py --list          # the mutations and their tests
    .venv/bin/python benchmarks/mutation.py --only heg_panel_leak cv_reference_leak

Prints ``N of M mutations killed`` and names the survivors. About 20-30 minutes on two cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
OUT = ROOT / "benchmarks" / "mutation.json"


@dataclass(frozen=True)
class Mutation:
    """One planted bug: ``find`` (exactly once in ``file``) becomes ``replace``."""

    id: str
    kind: str  # the class of bug (issue 18's list)
    file: str  # relative to src/sq_spade
    find: str
    replace: str
    tests: tuple[str, ...]  # pytest node ids or files that should catch it
    what: str = ""




def _node(path: str, *names: str) -> tuple[str, ...]:
    return tuple(f"{path}::{n}" for n in names)


LEAK = "tests/tl/test_leak_free.py"
PLUMB = "tests/tl/test_plumbing.py"
PATCHES = tuple(f"tests/pp/test_patches.py::{t}" for t in (
    "test_native_patch_centre_is_the_spot_pixel", "test_native_patch_centre_on_a_non_square_image",
    "test_resampled_patch_centres_from_a_coarser_level_within_a_tenth_of_a_pixel",
    "test_resampled_patch_centres_on_the_full_resolution_level_within_a_tenth_of_a_pixel",
    "test_resampled_patch_centre_is_the_spot_pixel", "test_corner_spot_is_padded_to_full_size",
    "test_padded_fraction_clips_each_axis_against_its_own_side", "test_same_patch_from_two_pyramid_levels"))
FILES = ("tests/test_model_file_checks.py",)

MUTATIONS: list[Mutation] = [
    # --- evaluation scores genes the query never measured
    Mutation("observed_ignored", "observed", "tl/_predict.py",
             "genes = (table.var[K.VAR.OBSERVED].to_numpy(bool) if K.VAR.OBSERVED in table.var",
             "genes = (np.ones(table.n_vars, bool) if K.VAR.OBSERVED in table.var",
             _node(PLUMB, "test_only_observed_genes_are_scored"),
             "evaluate_expression scores every panel gene, measured or not"),
    Mutation("observed_flag_all", "observed", "tl/_predict.py",
             "return obs, mask", "return obs, np.ones(len(panel), bool)",
             _node(PLUMB, "test_predict_flags_the_panel_genes_the_query_never_measured"),
             "predict_expression marks unmeasured genes as observed"),
    # --- patch geometry
    Mutation("resampled_half_pixel", "patch geometry", "pp/_patches.py",
             "bx0, by0 = cx - w / 2, cy - w / 2", "bx0, by0 = cx - w / 2 + 0.5, cy - w / 2 + 0.5", PATCHES,
             "resampled patches shifted by half a pixel"),
    Mutation("resampled_half_pixel_y", "patch geometry", "pp/_patches.py",
             "bx0, by0 = cx - w / 2, cy - w / 2", "bx0, by0 = cx - w / 2, cy - w / 2 - 0.5", PATCHES,
             "resampled patches shifted by half a pixel along y only"),
    Mutation("level_factor", "patch geometry", "pp/_patches.py",
             "centers[sec.rows] = xy0 / factor", "centers[sec.rows] = xy0 / factor + 0.5 * (factor > 1)", PATCHES,
             "spot centres off by half a pixel on coarser levels only"),
    Mutation("padded_wrong_axis", "patch geometry", "pp/_patches.py",
             "ox = max(0.0, min(cx + w / 2, level.width) - max(cx - w / 2, 0.0))",
             "ox = max(0.0, min(cx + w / 2, level.height) - max(cx - w / 2, 0.0))", PATCHES,
             "the padded fraction clipped against the wrong image axis"),
    Mutation("native_crop_offset", "patch geometry", "pp/_patches.py",
             "x0 = int(math.floor(cx - out / 2 + 0.5))", "x0 = int(math.floor(cx - out / 2))", PATCHES,
             "native patches one pixel off"),
    # --- SPADE routing temperature from the config
    Mutation("routing_temperature_default", "routing temperature", "models/_spade.py",
             "t = self.config.routing_temperature if temperature is None else check_positive_float(",
             "t = 0.1 if temperature is None else check_positive_float(",
             _node(PLUMB, "test_routing_temperature_of_the_config_is_the_default"),
             "Spade.embed_images ignores the config's routing temperature by default"),
    Mutation("routing_weights_temperature", "routing temperature", "models/_spade.py",
             "t = self.config.routing_temperature if temperature is None else float(temperature)",
             "t = 0.1 if temperature is None else float(temperature)",
             _node(PLUMB, "test_routing_temperature_of_the_config_is_the_default"),
             "Spade.routing_weights ignores the config's routing temperature by default"),
    Mutation("module_temperature_from_config", "routing temperature", "models/_spade.py",
             'c, f2e, temperature=float(config["routing_temperature"]),', "c, f2e,",
             _node(PLUMB, "test_routing_temperature_of_the_config_is_the_default"),
             "a loaded model's module routes at the default temperature"),
    # --- validation routing
    Mutation("validation_farthest_centroid", "validation routing", "tl/_experts.py",
             "val_expert = clus.fine_to_expert[d.argmin(1).numpy()]",
             "val_expert = clus.fine_to_expert[d.argmax(1).numpy()]",
             ("tests/tl/test_leak_free.py::test_validation_spots_are_routed_to_their_nearest_centroid",),
             "validation spots routed to their farthest centroid"),
    # --- gene_input
    Mutation("gene_input_raw_predict", "gene_input", "tl/_experts.py",
             "gin, _ = panel_expression(r_table, model.panel, gene_input=model.config.gene_input)",
             'gin, _ = panel_expression(r_table, model.panel, gene_input="log1p_cp10k")',
             _node(PLUMB, "test_gene_input_raw_feeds_raw_counts_to_the_gene_heads"),
             'gene_input="raw" ignored when the reference keys are built'),
    Mutation("gene_input_raw_train", "gene_input", "tl/_experts.py",
             "expr, _ = panel_expression(table, genes_list, gene_input=gene_input)",
             'expr, _ = panel_expression(table, genes_list, gene_input="log1p_cp10k")',
             _node(PLUMB, "test_train_experts_trains_on_the_gene_input_it_is_given"),
             'train_experts trains on normalised expression whatever gene_input says'),
    Mutation("panel_expression_raw", "gene_input", "pp/_genes.py",
             'Y = log1p_cp10k(X) if gene_input == "log1p_cp10k" else X', "Y = log1p_cp10k(X)",
             _node(PLUMB, "test_train_experts_trains_on_the_gene_input_it_is_given",
                   "test_gene_input_raw_feeds_raw_counts_to_the_gene_heads"), 'panel_expression normalises "raw" too'),
    # --- weighting and temperature of predict_expression
    Mutation("weighting_dropped", "weighting/temperature", "tl/_predict.py",
             "model=model, k=k, weighting=weighting, temperature=temperature,",
             'model=model, k=k, weighting="inverse_sq_l2", temperature=temperature,',
             _node(PLUMB, "test_weighting_and_temperature_reach_the_retrieval"),
             "weighting not passed through predict_expression"),
    Mutation("temperature_dropped", "weighting/temperature", "tl/_predict.py",
             "model=model, k=k, weighting=weighting, temperature=temperature,",
             "model=model, k=k, weighting=weighting, temperature=1.0,",
             _node(PLUMB, "test_weighting_and_temperature_reach_the_retrieval"),
             "temperature not passed through predict_expression"),
    Mutation("spade_temperature_dropped", "weighting/temperature", "tl/_experts.py",
             "temperature=temperature, return_variance=return_sd)",
             "return_variance=return_sd)",
             _node(PLUMB, "test_weighting_and_temperature_reach_the_retrieval[spade]"),
             "SPADE's predictor drops the softmax temperature"),
    # --- evaluate_expression's by and n_heg
    Mutation("by_ignored", "by/n_heg", "tl/_predict.py",
             "groups = table.obs[by].astype(str).to_numpy()",
             "groups = table.obs[K.OBS.SECTION].astype(str).to_numpy()",
             _node(PLUMB, "test_by_groups_the_spots_it_names"),
             "evaluate_expression groups by section whatever `by` says"),
    Mutation("n_heg_ignored", "by/n_heg", "tl/_predict.py",
             "summary, pg = expression_metrics(pred[m], obs[m], gene_names=names, n_heg=n_heg)",
             "summary, pg = expression_metrics(pred[m], obs[m], gene_names=names)",
             _node(PLUMB, "test_n_heg_sets_the_genes_of_heg"),
             "evaluate_expression ignores n_heg"),
    Mutation("heg_ranking_reversed", "by/n_heg", "_metrics.py",
             'heg[np.argsort(-mean_obs, kind="stable")[: min(int(n_heg), n_genes)]] = True',
             'heg[np.argsort(mean_obs, kind="stable")[: min(int(n_heg), n_genes)]] = True',
             _node(PLUMB, "test_n_heg_sets_the_genes_of_heg") + ("tests/test_metrics.py",),
             "HEG scores the least expressed genes"),
    # --- panels
    Mutation("spade_panel_last_section", "panel leak", "pp/_genes.py",
             "chosen.update(sub.var_names[top])", "chosen = set(sub.var_names[top])",
             _node(LEAK, "test_spade_panel_is_the_union_over_training_sections"),
             'the "spade" panel keeps only the last section\'s genes'),
    Mutation("heg_panel_leak", "panel leak", "pp/_genes.py",
             "norm = log1p_cp10k(X[train_rows][:, usable])", "norm = log1p_cp10k(X[:, usable])",
             _node(LEAK, "test_heg_panel_is_computed_without_the_held_out_section"),
             'the "heg" panel computed with the held-out section included'),
    Mutation("stored_panel_leak_guard", "panel leak", "tl/_common.py",
             "if chosen_on is not None and set(chosen_on) - set(train):", "if False:",
             ("tests/tl/test_experts.py::test_panel_leak_guard_and_bad_arguments",),
             "a stored panel chosen with the test section is reused silently"),
    # --- model-file checks
    Mutation("sha256_check_removed", "model-file checks", "_files.py",
             "if not isinstance(expected, str) or hashlib.sha256(data).hexdigest() != expected:", "if False:", FILES,
             "the sha256 check of saved tensors removed"),
    Mutation("config_digest_check_removed", "model-file checks", "_files.py",
             'if recorded != config_digest(doc) or meta.get("config_sha256") != recorded:', "if False:", FILES,
             "a config.json edited after saving accepted"),
    Mutation("class_check_removed", "model-file checks", "_files.py",
             'if doc.get("class") != cls:', "if False:", FILES, "the model-class check removed"),
    Mutation("unknown_keys_check_removed", "model-file checks", "_files.py",
             "if unknown:\n        raise ModelFileError", "if False:\n        raise ModelFileError", FILES,
             "unknown top-level keys accepted"),
    Mutation("tensors_name_check_removed", "model-file checks", "_files.py",
             "if not isinstance(name, str) or not TENSORS_PATTERN.match(name):", "if not isinstance(name, str):",
             FILES, "a tensors path outside the folder followed"),
    Mutation("newer_format_accepted", "model-file checks", "_files.py",
             "if version > FORMAT_VERSION:", "if version > FORMAT_VERSION + 100:", FILES,
             "a newer model-file format read as if current"),
    # --- cross-validation references
    Mutation("cv_reference_leak", "cross-validation leak", "tl/_cross_validate.py",
             "reference=fold_train if retrieval else None,",
             "reference=_fold_object(sdata, work, sections, table_key, as_sd) if retrieval else None,",
             _node(LEAK, "test_cross_validation_retrieves_from_a_reference_without_the_test_section"),
             "cross-validation retrieves from a reference holding the held-out section"),
    Mutation("cv_trains_on_test", "cross-validation leak", "tl/_cross_validate.py",
             "rest = [s for s in sections if s not in test]", "rest = list(sections)",
             _node(LEAK, "test_cross_validation_retrieves_from_a_reference_without_the_test_section"),
             "cross-validation trains on the held-out section"),
    # --- GPU-only averaging branch (run on the CPU by its test)
    Mutation("gather_mean_unweighted", "GPU averaging", "nn/retrieval.py",
             'out[s:s + step] = torch.einsum("bk,bkg->bg", w[s:s + step], values[idx[s:s + step]])',
             "out[s:s + step] = values[idx[s:s + step]].mean(1)", ("tests/nn/test_retrieval.py",),
             "the accelerator path averages without the weights"),
    Mutation("gather_mean_block", "GPU averaging", "nn/retrieval.py",
             'out[s:s + step] = torch.einsum("bk,bkg->bg", w[s:s + step], values[idx[s:s + step]])',
             'out[s:s + step] = torch.einsum("bk,bkg->bg", w[:step][: len(idx[s:s + step])], '
             "values[idx[s:s + step]])", ("tests/nn/test_retrieval.py",),
             "the accelerator path reuses the first block's weights"),
    # --- values of the numerical kernels (the classes the suite already caught; kept as controls)
    Mutation("inverse_l2_not_squared", "kernels", "nn/retrieval.py", "inv = 1.0 / d2", "inv = 1.0 / d2.sqrt()",
             ("tests/nn/test_retrieval.py",), "inverse distance instead of inverse squared distance"),
    Mutation("bleep_targets_hard", "kernels", "nn/losses.py",
             "targets = torch.softmax(_fill(sim, col), dim=-1)",
             "targets = torch.softmax(_fill(sim, col) * 100, dim=-1)", ("tests/nn/test_losses.py",),
             "BLEEP's soft targets sharpened"),
    Mutation("spot_encoder_no_residual", "kernels", "nn/spot_encoder.py",
             "x = x + self.attn(x, mask, self_only)", "x = self.attn(x, mask, self_only)",
             ("tests/nn/test_spot_encoder.py",), "the spot encoder's attention loses its residual"),
    Mutation("spot_encoder_ff_norm", "kernels", "nn/spot_encoder.py",
             "nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout),",
             "nn.Identity(), nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout),",
             ("tests/nn/test_spot_encoder.py::test_forward_matches_a_hand_computed_pass",),
             "the spot encoder's MLP loses its LayerNorm"),
]


def check(m: Mutation, root: Path = SRC) -> str | None:
    """Why ``m`` cannot be applied to the source under ``root`` (``None``: it can)."""
    path = root / "sq_spade" / m.file
    if not path.is_file():
        return f"{m.file} does not exist"
    n = path.read_text().count(m.find)
    return None if n == 1 else f"snippet occurs {n} times in {m.file} (expected once)"


def run_one(m: Mutation, python: str, timeout: float) -> dict:
    """Apply ``m`` in a temporary copy of src/ and run its tests; ``status`` killed / survived / stale / timeout."""
    problem = check(m)
    if problem:
        return {"id": m.id, "status": "stale", "detail": problem}
    with tempfile.TemporaryDirectory(prefix="sq_spade_mut_") as tmp:
        dst = Path(tmp) / "src"
        shutil.copytree(SRC, dst, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        f = dst / "sq_spade" / m.file
        f.write_text(f.read_text().replace(m.find, m.replace))
        env = {**os.environ, "PYTHONPATH": str(dst), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
               "PYTHONDONTWRITEBYTECODE": "1"}
        cmd = [python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "not realdata", *m.tests]
        t0 = time.time()
        try:
            out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"id": m.id, "status": "timeout", "seconds": round(time.time() - t0, 1)}
        status = {0: "survived", 1: "killed"}.get(out.returncode, "error")
        detail = (out.stdout + out.stderr)[-1500:] if status == "error" else ""
        return {"id": m.id, "status": status, "seconds": round(time.time() - t0, 1), "detail": detail}


def baseline(mutations: list[Mutation], python: str, timeout: float) -> bool:
    """Whether the covering tests pass on the unmutated source (else a "kill" would mean nothing)."""
    tests = sorted({t for m in mutations for t in m.tests})
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    out = subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not realdata", *tests],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout * 3)
    if out.returncode != 0:
        print((out.stdout + out.stderr)[-3000:])
    return out.returncode == 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--list", action="store_true", help="print the mutations and exit")
    ap.add_argument("--only", nargs="+", metavar="ID", help="run these mutations only")
    ap.add_argument("--out", default=str(OUT), help="JSON written (default benchmarks/mutation.json)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per mutation")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--no-baseline", action="store_true", help="skip the run of the tests on the unmutated source")
    ap.add_argument("--jobs", type=int, default=1, help="mutations run at once (each in its own copy)")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or m.id in args.only]
    if args.only and len(chosen) != len(set(args.only)):
        ap.error(f"unknown ids: {sorted(set(args.only) - {m.id for m in MUTATIONS})}")
    if args.list:
        for m in chosen:
            print(f"{m.id:32s} [{m.kind}] {m.file}: {m.what}\n{'':32s} tests: {' '.join(m.tests)}")
        print(f"{len(chosen)} mutations over {len({m.kind for m in chosen})} classes")
        return 0
    t0 = time.time()
    stale = [f"{m.id}: {p}" for m in chosen if (p := check(m))]
    if stale:
        print("stale mutations (refresh their snippets):\n  " + "\n  ".join(stale))
    if not args.no_baseline:
        if not baseline(chosen, args.python, args.timeout):
            print("the covering tests fail on the unmutated source: no mutation score")
            return 1
        print(f"baseline: the covering tests pass on the unmutated source ({time.time() - t0:.0f} s)", flush=True)
    from concurrent.futures import ThreadPoolExecutor

    done = 0

    def one(m: Mutation) -> dict:
        nonlocal done
        r = run_one(m, args.python, args.timeout)
        done += 1
        print(f"[{done}/{len(chosen)}] {m.id:32s} {r['status']:9s} {r.get('seconds', '')}", flush=True)
        return r

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        results = list(pool.map(one, chosen))
    killed = [r for r in results if r["status"] == "killed"]
    survivors = [r["id"] for r in results if r["status"] != "killed"]
    print(f"{len(killed)} of {len(results)} mutations killed ({100 * len(killed) / max(1, len(results)):.0f} %)")
    if survivors:
        print("not killed: " + ", ".join(f"{r['id']} ({r['status']})" for r in results if r["status"] != "killed"))
    by_kind: dict[str, list[int]] = {}
    for m, r in zip(chosen, results, strict=True):
        by_kind.setdefault(m.kind, [0, 0])[0] += r["status"] == "killed"
        by_kind[m.kind][1] += 1
    doc = {"killed": len(killed), "total": len(results), "survivors": survivors,
           "by_kind": {k: {"killed": v[0], "total": v[1]} for k, v in by_kind.items()},
           "minutes": round((time.time() - t0) / 60, 1), "command": "make mutation",
           "mutations": [{**asdict(m), "tests": list(m.tests), **r} for m, r in zip(chosen, results, strict=True)]}
    if not args.only:
        Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
        print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
