"""Few-shot probes on her2st A1's pathologist labels: SPADE vs raw Lite0 vs mclSTExp embeddings.

SPADE and mclSTExp are trained on B4, C2, C3 (C4 validation; other patients than A1), then A1
is embedded. k labelled spots per class (the same spots for every embedding), logistic
regression, tested on the other labelled spots; balanced accuracy and macro one-vs-rest AUC,
mean and SD over repeats. Run: ``.venv/bin/python benchmarks/bench_few_shot.py``.
"""

from __future__ import annotations

import argparse
import warnings

import pandas as pd
from _common import machine, write_json
from _data import tables


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--json", default=None, help="also write the table to this JSON file")
    args = ap.parse_args()
    import sq_spade as sqs

    sqs.settings.progress = False
    warnings.simplefilter("ignore", UserWarning)
    print("machine:", machine())
    train = tables(["B4", "C2", "C3", "C4"])
    a1 = tables(["A1"])
    labels = sqs.datasets.her2st_labels("A1")
    a1.obs["label"] = pd.Categorical(labels.reindex(a1.obs["spot_id"].astype(str)).to_numpy())
    spade = sqs.tl.train_experts(train, train_sections=["B4", "C2", "C3"], validation_sections=["C4"],
                                 n_experts=args.experts, seed=args.seed)
    sqs.tl.embed(a1, spade)
    mcl = sqs.tl.train_contrastive(train, method="mclstexp", panel=spade.panel, train_sections=["B4", "C2", "C3"],
                                   validation_sections=["C4"], seed=args.seed)
    a1.obsm["X_mclstexp"] = mcl.embed_images(a1.obsm["X_efficientnet_lite0"])
    res = sqs.tl.few_shot(a1, label_key="label", embedding_keys=["X_spade", "X_efficientnet_lite0", "X_mclstexp"],
                          shots=(1, 2, 4, 8, 16), n_repeats=args.repeats, seed=args.seed)
    print(f"A1: {int(a1.obs['label'].notna().sum())} labelled spots; classes "
          f"{a1.obs['label'].value_counts().to_dict()}; dropped per k: {res.attrs.get('dropped_classes')}")
    with pd.option_context("display.width", 200):
        print(res.round(3).to_string(index=False))
    if args.json:
        write_json(args.json, {"machine": machine(), "repeats": args.repeats, "seed": args.seed,
                               "n_labelled": int(a1.obs["label"].notna().sum()),
                               "classes": {str(k): int(v) for k, v in a1.obs["label"].value_counts().items()},
                               "rows": res.to_dict(orient="records")})


if __name__ == "__main__":
    main()
