"""Do the engines agree? The grid with engine=openvino and engine=tensorflow, same data and seed;
and the best point's logged whole model against its head on cached features.

    PIPELINE_DATA_DIR=../shared/data python benchmarks/engine_agreement.py [--max-per-class 250] [--image-size 128]

Both grids run in this process on the same blood_cells subset (official TEST split), each with
a fresh tracking store and an empty feature cache, at the precision `auto` picks. Then the
OpenVINO grid's best model is evaluated whole (feature_cache=off: images through the logged
model on the engine) and its predicted classes are compared with those of the point's head on
cached features. Last lines: max_val_accuracy_gap_points=<largest |OpenVINO - TensorFlow|
validation accuracy over the seven points, in percentage points> and
whole_vs_cached_agreement=<share of test images given the same class>.
"""

import argparse
import os
import tempfile

import mlflow
import pandas as pd
from extraction import cpu_line

from pipeline.config import EvaluateConfig, GridConfig
from pipeline.evaluate import evaluate
from pipeline.grid import grid


def predicted(run_id: str) -> pd.Series:
    table = pd.read_csv(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/predictions.csv"))
    return table.set_index("path")["predicted"].sort_index()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-per-class", type=int, default=250,
                        help="250: 200 validation images, so one image is 0.5 points (the target is 1)")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    val, agreement = {}, None
    for engine in ("openvino", "tensorflow"):
        with tempfile.TemporaryDirectory() as folder:
            mlflow.set_tracking_uri(f"sqlite:///{folder}/mlflow.db")
            os.chdir(folder)
            cfg = GridConfig(dataset="blood_cells", weights="none", max_per_class=args.max_per_class,
                             epochs=args.epochs, image_size=args.image_size, engine=engine,
                             cache_dir=f"{folder}/cache", experiment=f"engine-{engine}")
            result = grid(cfg)
            runs = mlflow.search_runs(experiment_names=[cfg.experiment], filter_string="tags.grid_point != ''")
            val[engine] = runs.set_index(runs["tags.grid_point"].astype(int))["metrics.best_val_accuracy"].sort_index()
            if engine == "openvino":
                data_uri = mlflow.get_run(result.run_id).info.artifact_uri + "/data"
                whole = evaluate(EvaluateConfig(model=result.best_model_uri, data=data_uri, feature_cache="off",
                                                engine=engine, cache_dir=cfg.cache_dir))
                agreement = (predicted(whole.run_id) == predicted(result.best_run_id)).mean()
    gap = (val["openvino"] - val["tensorflow"]).abs() * 100
    print(cpu_line())
    print(pd.DataFrame({"openvino": val["openvino"], "tensorflow": val["tensorflow"], "gap_points": gap})
          .rename_axis("point").to_string(float_format=lambda v: f"{v:.4f}"))
    print(f"max_val_accuracy_gap_points={gap.max():.2f}")
    print(f"whole_vs_cached_agreement={agreement:.4f}")


if __name__ == "__main__":
    main()
