"""A scikit-learn pipeline over a DataFrame (numbers with gaps, string categories), packed as a table pod.

    python examples/tabular.py --out /tmp/churn [--pack --home DIR]
    modelpod serve churn-table
    curl -s localhost:8080/v1/models/churn-table:predict \
      -d '{"instances": [{"tenure": 3, "spend": 20.5, "region": "north", "plan": "pro"}]}'

Writes ``model.skops`` and ``train.csv``; ``--pack`` packs them with ``--sample train.csv
--outputs label,probabilities``: one input per column, strings reach the pipeline as ``str``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path


def train(out: Path) -> None:
    import numpy as np
    import pandas as pd
    import skops.io as sio
    from sklearn.compose import ColumnTransformer
    from sklearn.ensemble import GradientBoostingClassifier
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder

    rng = np.random.default_rng(0)
    n = 300
    frame = pd.DataFrame({
        "tenure": rng.integers(0, 60, n).astype(float),
        "spend": rng.gamma(2.0, 30.0, n).round(2),
        "region": rng.choice(["north", "south", "east", "west"], n).astype(object),
        "plan": rng.choice(["basic", "pro"], n).astype(object),
    })
    frame.loc[rng.random(n) < 0.1, "spend"] = np.nan
    churn = (frame["tenure"] < 12) & ((frame["plan"] == "basic") | (frame["region"] == "east"))
    pipeline = Pipeline([
        ("columns", ColumnTransformer([
            ("numbers", SimpleImputer(strategy="median"), ["tenure", "spend"]),
            ("categories", OneHotEncoder(handle_unknown="ignore"), ["region", "plan"]),
        ])),
        ("model", GradientBoostingClassifier(n_estimators=20, random_state=0)),
    ]).fit(frame, np.where(churn, "churn", "stay"))
    out.mkdir(parents=True, exist_ok=True)
    sio.dump(pipeline, out / "model.skops")
    frame.to_csv(out / "train.csv", index=False)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--pack", action="store_true", help="pack it as churn-table")
    parser.add_argument("--home", help="store directory")
    args = parser.parse_args(argv)
    train(args.out)
    if args.pack:
        from modelpod.cli import main as cli

        home = ["--home", args.home] if args.home else []
        return cli([*home, "pack", str(args.out / "model.skops"), "--name", "churn-table", "--sample",
                    str(args.out / "train.csv"), "--outputs", "label,probabilities"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
